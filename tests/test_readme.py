"""The README is real: every Python block runs as printed, and its cheap shell lines work."""
import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import deepzero, deepzero_in_process

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def _run(block: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4


def test_readme_api_example_runs_and_trains():
    block = re.search(r"## The ZO API.*?```python\n(.*?)```", TEXT, re.S).group(1)
    assert len(block.strip().splitlines()) <= 16
    ns = _run(block)
    model, data, zo = ns["model"], ns["data"], ns["zo"]
    model.eval()
    import torch

    with torch.no_grad():
        acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert acc > 0.3, acc                     # one epoch of sparse ZO-CGE; chance is 0.1
    assert zo.queries > 0 and zo.last_engine == "fast"


def test_readme_solver_in_the_loop_example_reduces_the_rollout_error():
    import torch

    block = re.search(r"### Objectives beyond.*?```python\n(.*?)```", TEXT, re.S).group(1)
    torch.manual_seed(0)
    ns = _run(block)
    net, rollout, zo = ns["net"], ns["rollout"], ns["zo"]
    B, m, q = ns["B"], ns["m"], zo.q
    torch.nn.init.zeros_(net.weight), torch.nn.init.zeros_(net.bias)
    with torch.no_grad():
        plain = rollout.fn(net, {n: p.detach().unsqueeze(0) for n, p in net.named_parameters()})[0]
    assert ns["loss"] < 0.8 * plain              # better than the uncorrected coarse solver
    assert zo.queries == 30 * (q + 1) * B * m    # honest count: every set is B·m solver sample-steps


def test_every_other_python_block_runs_as_printed():
    others = [b for b in BLOCKS if "zo.backward(F.cross_entropy" not in b and "@batched_objective" not in b]
    assert others
    for block in others:
        _run(block)


@pytest.mark.parametrize("line", [l for l in re.findall(r"^\.venv/bin/(deepzero [^\n#<]*?)\s*(?:#.*)?$", TEXT, re.M)
                                  if "--help" in l or l.split()[1:2] == ["runs"]] or ["deepzero --help"])
def test_cheap_shell_lines(tmp_path, line):
    args = shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]     # optional parts dropped
    proc = deepzero(*args, home=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_help_of_every_readme_command(tmp_path):
    cmds = sorted({tuple(l.split()[1:3]) for l in re.findall(r"^\.venv/bin/(deepzero [a-z]+ [a-z]+)", TEXT, re.M)})
    assert ("classify", "train") in cmds
    for cmd in cmds:                                # in this process: a subprocess each cost ~3 s
        proc = deepzero_in_process(*cmd, "--help", home=tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (cmd, proc.stderr)
