"""Targets: every way to bring the classifier ends as the same query-only black box.

Oracle: the in-process model (or a fixed linear map) on the same images. Real subprocesses and
real loopback HTTP servers throughout; a small numpy-only classifier program (written to a temp
file) plays the user's program, misbehaving on request.
"""
import dataclasses
import json
import os
import shlex
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from applications.certified_defense.provider import save_target, serve_target, train_target
from applications.certified_defense.targets import Target, TargetError, load_target
from core import BudgetExceeded, NotDifferentiable
from core.models import Normalize, from_spec
from core.runtime.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[3]
SHAPE, K = (1, 8, 8), 10                    # sklearn digits
PY = shlex.quote(sys.executable)
W = np.random.default_rng(0).standard_normal((64, K)).astype(np.float32)   # the fake program's classifier

PROGRAM = '''
"""A classifier program for the tests: logits = x.flatten() @ W; misbehaves per --mode."""
import argparse, sys, time
import numpy as np
from solvers.query import QuerySpec, serve_query

p = argparse.ArgumentParser()
p.add_argument("--mode", default="logits")
p.add_argument("--record", default=None)
p.add_argument("--classes", type=int, default=10)
a = p.parse_args()
W = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
labels = a.mode in ("labels", "outofrange")
spec = QuerySpec((1, 8, 8), () if labels else (a.classes,), np.dtype(np.float32),
                 np.dtype(np.int64 if labels else np.float32),
                 {"output": "labels" if labels else "logits", "num_classes": a.classes})

def classify(x):
    if a.record:
        with open(a.record, "a") as f:
            f.write(f"{len(x)}\\n")
    print(f"fake classifier: batch of {len(x)} in mode {a.mode}", file=sys.stderr, flush=True)
    logits = x.reshape(len(x), -1) @ W
    if a.mode == "crash":
        print("fatal: out of GPU memory in layer 3", file=sys.stderr, flush=True)
        sys.exit(3)
    if a.mode == "hang":
        time.sleep(3600)
    if a.mode == "nan":
        logits[0, 1] = np.nan
    if a.mode == "shape":
        return logits[:, :7]
    if a.mode == "dtype":
        return logits.astype(np.float64)
    if a.mode == "outofrange":
        return np.full(len(x), 12, dtype=np.int64)
    return logits.argmax(1).astype(np.int64) if labels else logits

out = sys.stdout.buffer
sys.stdout = sys.stderr
sys.exit(serve_query(classify, spec, sys.stdin.buffer, out))
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def linear_logits(x: torch.Tensor) -> torch.Tensor:
    """A plain function target (``pkg.mod:fn``): the fake program's classifier in torch."""
    return x.reshape(len(x), -1) @ torch.from_numpy(W)


def tiny_classifier() -> nn.Module:
    """A no-argument factory target (``pkg.mod:factory``): a seeded conv net on digits."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(Normalize([0.3], [0.3]), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(144, K))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real target, trained once: cnn on 512 digits, 2 epochs; saved as both checkpoint kinds."""
    from core.runtime.data import DataSplit, load_dataset

    data = load_dataset("digits", normalize=False)
    small = dataclasses.replace(data, train=DataSplit(data.train.x[:512], data.train.y[:512]))
    model, spec = train_target(small, epochs=2, seed=0)
    d = tmp_path_factory.mktemp("targets")
    defense = save_target(d / "target.pt", model, input_shape=SHAPE, num_classes=K)
    classify = save_checkpoint(d / "classify.pt", {"app": "classify", "model_spec": spec,
                                                    "model": model.state_dict(),
                                                    "config": {"data": {"name": "digits"}}})
    return {"data": data, "model": model, "spec": spec, "defense": str(defense), "classify": str(classify),
            "x": data.test.x[:9]}


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("program") / "fake_classifier.py"
    path.write_text(PROGRAM)
    return f"exec:{PY} {shlex.quote(str(path))}"


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def load(spec, **kw):
    return load_target(spec, data_shape=SHAPE, num_classes=K, **{"timeout": 30, **kw})


def test_train_target_is_an_ordinary_pixel_classifier(trained):
    model, spec, data = trained["model"], trained["spec"], trained["data"]
    assert isinstance(model[0], Normalize) and not model.training
    assert spec["normalize"] == {"mean": list(data.mean), "std": list(data.std)}
    with torch.no_grad():
        acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
        assert acc > 0.8, acc                                  # 0.93 with seed 0
        assert torch.equal(from_spec(spec, model.state_dict()).eval()(data.test.x), model(data.test.x))
    with pytest.raises(ValueError, match="normalize=False"):
        train_target(dataclasses.replace(data, normalized=True), epochs=1)


@pytest.mark.parametrize("kind", ["classify", "defense", "exec", "http-npy", "http-json"])
def test_every_kind_of_target_answers_the_models_logits(trained, kind):
    model, x = trained["model"], trained["x"]
    server = None
    if kind in ("classify", "defense"):
        spec = trained[kind]
    elif kind == "exec":
        spec = f"exec:{PY} -m applications.certified_defense.example_target --checkpoint {trained['defense']}"
    else:
        server = serve_target(model, input_shape=SHAPE, npy=kind == "http-npy")
        spec = server.url
    try:
        with load(spec) as target:
            assert isinstance(target, Target) and (target.num_classes, target.input_shape) == (K, SHAPE)
            out = target.blackbox(x)
            with torch.no_grad():
                torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
            assert out.dtype == torch.float32 and target.blackbox.queries == len(x)
            assert (target.white_box is not None) == (kind in ("classify", "defense"))
            pid = target._closer.__self__.proc.pid if kind == "exec" else None
        if pid is not None:
            assert not _alive(pid)
    finally:
        if server is not None:
            server.close()


def test_labels_only_returns_int64_labels(trained, program):
    model, x = trained["model"], trained["x"]
    with torch.no_grad():
        want = model(x).argmax(1)
    spec = (f"exec:{PY} -m applications.certified_defense.example_target --checkpoint {trained['defense']} "
            "--labels-only")
    for source in (trained["defense"], spec):                  # argmax here / labels from the program
        with load(source, labels_only=True) as target:
            out = target.blackbox(x)
            assert out.dtype == torch.int64 and torch.equal(out, want) and torch.equal(target.labels(x), want)
    with load(f"{program} --mode labels", labels_only=True) as target:
        assert torch.equal(target.blackbox(x), torch.from_numpy(x.reshape(len(x), -1).numpy() @ W).argmax(1))
    with pytest.raises(TargetError, match="answers labels only, not logits; load it in labels-only mode"):
        load(f"{program} --mode labels")


def test_queries_budget_and_max_batch_as_the_program_sees_them(program, tmp_path, trained):
    record, x = tmp_path / "batches.txt", trained["x"]
    with load(f"{program} --record {record}", budget=10, max_batch=3) as target:
        out = target.blackbox(x[:7])
        np.testing.assert_allclose(out.numpy(), x[:7].reshape(7, -1).numpy() @ W, rtol=1e-5, atol=1e-5)
        assert record.read_text().split() == ["3", "3", "1"]
        with pytest.raises(BudgetExceeded, match="7 of 10 used, this call needs 4 more"):
            target.blackbox(x[:4])
        assert record.read_text().split() == ["3", "3", "1"]     # refused before the program saw it
        assert target.blackbox.query_state() == {"queries": 7, "budget": 10}
        target.blackbox(x[:3])
        assert target.blackbox.queries == 10


@pytest.mark.parametrize("mode,match", [
    ("crash", r"exited \(status 3\) during a query \| stderr: .*out of GPU memory in layer 3"),
    ("hang", r"no answer to a query within 1s \(hung\?\); killed it"),
    ("nan", r"returned 1 NaN/Inf values"),
    ("shape", r"returned shape \(2, 7\); expected \(2, 10\)"),
    ("dtype", r"returned dtype float64; expected float32"),
])
def test_a_failing_program_is_one_clear_error_and_leaves_no_process(program, mode, match):
    target = load(f"{program} --mode {mode}", timeout=1)
    pid = target._closer.__self__.proc.pid
    start = time.monotonic()
    with pytest.raises(TargetError, match=match) as err:
        target.blackbox(torch.rand(2, *SHAPE))
    assert time.monotonic() - start < 4 and "\n" not in str(err.value)
    assert target.blackbox.queries == 0
    target.close()
    assert not _alive(pid)


def test_out_of_range_labels_are_refused(program):
    with load(f"{program} --mode labels", labels_only=True) as target:
        target.blackbox(torch.rand(1, *SHAPE))
    with load(f"{program} --mode outofrange", labels_only=True) as target:
        with pytest.raises(TargetError, match="labels outside 0..9"):
            target.blackbox(torch.rand(2, *SHAPE))


@pytest.mark.parametrize("args,kw,match", [
    ("--classes 7", {}, "has 7 classes; the data have 10"),
    ("", {"data_shape": (3, 8, 8)}, r"takes images \[1, 8, 8\]; the data are \[3, 8, 8\]"),
])
def test_a_program_that_does_not_fit_the_data_is_refused_at_start(program, args, kw, match):
    with pytest.raises(TargetError, match=match):
        load_target(f"{program} {args}", **{"data_shape": SHAPE, "num_classes": K, **kw})


def test_a_missing_or_silent_program_is_a_clear_error():
    with pytest.raises(TargetError, match="cannot start classifier program"):
        load("exec:/nonexistent/classifier --flag")
    with pytest.raises(TargetError, match=r"no answer to handshake within 1s"):
        load(f"exec:{PY} -c 'import time; time.sleep(60)'", timeout=1)
    with pytest.raises(TargetError, match=r"exited \(status 2\) during handshake.*does not exist"):
        load(f"exec:{PY} -m applications.certified_defense.example_target --checkpoint /nonexistent.pt")


@pytest.mark.parametrize("kind", ["checkpoint", "exec"])
def test_the_zo_side_can_never_backpropagate_into_the_box(trained, program, kind):
    with load(trained["defense"] if kind == "checkpoint" else program) as target:
        assert list(target.blackbox.parameters()) == []     # no classifier weight for an estimator to perturb
        denoised = trained["x"] * nn.Parameter(torch.ones(()))
        with pytest.raises(NotDifferentiable, match="query-only"):
            target.blackbox(denoised).sum().backward()
        if target.white_box is not None:
            assert all(p.grad is None for p in target.white_box.parameters())


def test_import_targets(trained):
    x = trained["x"]
    mod = "tests.applications.certified_defense.test_targets"
    with load(f"{mod}:tiny_classifier") as target:
        assert isinstance(target.white_box, nn.Module)
        with torch.no_grad():
            assert torch.equal(target.blackbox(x), tiny_classifier()(x))
    with load(f"{mod}:linear_logits") as target:
        assert target.white_box is None and torch.equal(target.blackbox(x), linear_logits(x))
    with pytest.raises(TargetError, match="cannot import target 'no_such_pkg.mod:f': ModuleNotFoundError"):
        load("no_such_pkg.mod:f")
    with pytest.raises(TargetError, match="has 10 classes; the data have 4"):
        load_target(f"{mod}:tiny_classifier", data_shape=SHAPE, num_classes=4)


def test_http_server_budget_loopback_and_plain_umbridge(trained):
    model, x = trained["model"], trained["x"]
    with load(trained["defense"], budget=5) as served, serve_target(served) as server:
        with load(server.url) as target:
            target.blackbox(x[:5])
            with pytest.raises(TargetError, match="BudgetExceeded: .*5 of 5 used"):
                target.blackbox(x[:1])
            assert server.target.blackbox.queries == 5
    with pytest.raises(TargetError, match="refusing to bind 0.0.0.0"):
        serve_target(model, "0.0.0.0", input_shape=SHAPE)
    with _plain_umbridge(model) as url, load(url) as target:      # one Evaluate per image
        with torch.no_grad():
            torch.testing.assert_close(target.blackbox(x[:3]), model(x[:3]), rtol=1e-5, atol=1e-5)


class _plain_umbridge:
    """A minimal UM-Bridge model server (no deepzero extensions): one sample per Evaluate."""

    def __init__(self, model):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._reply({"protocolVersion": 1.0, "models": ["forward"]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/Evaluate":
                    with torch.no_grad():
                        out = model(torch.tensor(body["input"][0], dtype=torch.float32).reshape(1, *SHAPE))
                    return self._reply({"output": [out.reshape(-1).tolist()]})
                self._reply({"/ModelInfo": {"support": {"Evaluate": True}},
                             "/InputSizes": {"inputSizes": [64]},
                             "/OutputSizes": {"outputSizes": [K]}}[self.path])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_bad_specs_and_checkpoints_are_one_line_errors(trained, tmp_path):
    cases = [("nonsense spec", "unknown target 'nonsense spec'"),
             (str(tmp_path / "missing.pt"), "missing.pt does not exist"),
             ("http://127.0.0.1:9", "unreachable")]
    for name, app in [("run.pt", {"app": "defense", "model_spec": trained["spec"], "model": {}}),
                      ("other.pt", {"app": "pde", "model_spec": trained["spec"], "model": {}})]:
        save_checkpoint(tmp_path / name, app)
    cases += [(str(tmp_path / "run.pt"), "defense run's checkpoint .* not a target"),
              (str(tmp_path / "other.pt"), "written by app 'pde'")]
    for spec, match in cases:
        with pytest.raises(TargetError, match=match) as err:
            load(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(TargetError, match=r"takes images \[1, 8, 8\]; the data are \[1, 28, 28\]"):
        load_target(trained["defense"], data_shape=(1, 28, 28), num_classes=K)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        load_target(trained["defense"], data_shape=SHAPE, num_classes=1)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        load(trained["defense"], max_batch=0)
