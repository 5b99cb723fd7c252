"""The README's API example is real code: run it as written."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs_and_trains():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## The ZO API.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 16
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    model, data, zo = namespace["model"], namespace["data"], namespace["zo"]
    model.eval()
    import torch

    with torch.no_grad():
        acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert acc > 0.3, acc                     # one epoch of sparse ZO-CGE; chance is 0.1
    assert zo.queries > 0 and zo.last_engine == "fast"
