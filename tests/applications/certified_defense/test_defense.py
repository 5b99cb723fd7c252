"""The defense application as users run it: the main job's smoke preset, the trainers, bad input."""
import copy
import sys

import pytest
import torch

from tests.helpers import deepzero, deepzero_in_process, mlflow_client as _client, one_line_error, tracked_in_store


@pytest.fixture(scope="module")
def smoke_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("defense")
    proc = deepzero("defense", "run", "--preset", "smoke", "--no-progress", home=home, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return home, proc


def test_run_smoke_logs_every_variant_certified_and_compared(smoke_home):
    home, proc = smoke_home
    assert "ZO-DS" in proc.stdout and "certified_accuracy_r0" in proc.stdout
    client = _client(home)
    exp = client.get_experiment_by_name("deepzero/defense")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "defense-run"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"none", "fo-ds", "zo-ds", "zo-ae-ds"}
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        assert {"certified_accuracy_r0", "certified_accuracy_r0.25", "acr"} <= set(run.data.metrics), name
        assert any(a.path.endswith(".tsv") for a in client.list_artifacts(run.info.run_id, "certify")), name
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/table.tsv", "comparison/certified_accuracy_vs_radius.png"} <= arts
    # equal query budgets: ZO-AE-DS was given exactly the classifier queries ZO-DS spent
    zo_ds, zo_ae = children["zo-ds"], children["zo-ae-ds"]
    spent = zo_ds.data.metrics["queries"]
    assert 0 < zo_ae.data.metrics["queries"] <= spent
    assert "budget exhausted" in zo_ae.data.tags.get("deepzero.stop_reason", "")
    assert zo_ds.data.tags["white_box"] == "no" and children["fo-ds"].data.tags["white_box"] == "yes"


def test_certify_verb_resumes_its_table_and_refuses_foreign_checkpoints(smoke_home, tmp_path):
    home, _ = smoke_home
    (target,) = (home / "runs" / "defense" / "targets").glob("*.pt")
    out = tmp_path / "c.tsv"
    args = ("defense", "certify", "none", "--preset", "smoke", "--target", str(target), "--out", str(out),
            "--no-progress", "--set", "certify.max=2")
    proc = deepzero(*args, home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = out.read_text().splitlines()
    assert first[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"] and len(first) == 3
    proc = deepzero(*args[:-1], "certify.max=3", home=home, timeout=300)   # continues after the 2 done rows
    rows = out.read_text().splitlines()
    assert proc.returncode == 0 and rows[:3] == first and len(rows) == 4
    line = one_line_error(deepzero("defense", "certify", str(target), "--preset", "smoke", "--target", str(target),
                                   home=home))
    assert "not a denoiser checkpoint" in line


def test_verify_verb_reports_verified_pgd_and_clean(smoke_home):
    home, _ = smoke_home
    (target,) = (home / "runs" / "defense" / "targets").glob("*.pt")
    from core.runtime.checkpoint import load_checkpoint

    by_method = {load_checkpoint(p)["config"]["optim"]["method"]: p
                 for p in (home / "runs" / "defense").glob("*/checkpoint.pt")}
    denoiser = by_method["zo-ds"]
    line = one_line_error(deepzero("defense", "verify", "--preset", "smoke", "--target", str(target), "--denoiser",
                                   str(by_method["zo-ae-ds"]), home=home, timeout=300))
    assert "ZO-AE-DS denoiser" in line
    proc = deepzero("defense", "verify", "--preset", "smoke", "--target", str(target), "--denoiser", str(denoiser),
                    "--methods", "IBP", "--norms", "inf", "--eps", "0.01", "--samples", "4", home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    header, *rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert {"model", "verified_accuracy", "pgd_accuracy", "clean_accuracy"} <= set(header) and len(rows) == 2
    col = {k: i for i, k in enumerate(header)}
    for r in rows:
        assert float(r[col["verified_accuracy"]]) <= float(r[col["pgd_accuracy"]]) <= float(r[col["clean_accuracy"]])


@pytest.mark.parametrize("args,expected", [
    (["--set", "denoiser.sigma=0"], "'denoiser.sigma' must be > 0"),
    (["--set", "certify.n0=500", "--set", "certify.n=100"], "must not exceed certify.n"),
    (["--set", "certify.alpha=1.5"], "'certify.alpha' must be in (0, 1)"),
    (["--method", "zo-ds", "--labels-only"], "needs the classifier's logits"),
    (["--method", "nope"], "must be one of fo-ds, zo-ae-ds, zo-ds"),
    (["--target", "/nonexistent/target.pt"], "target: "),
    (["--target", "no_such_module_xyz:fn"], "target: "),
])
def test_bad_input_is_one_line_and_opens_no_run(tmp_path, args, expected):
    line = one_line_error(deepzero_in_process("defense", "train", "--preset", "smoke", *args, home=tmp_path))
    assert expected in line, line
    assert tracked_in_store(tmp_path) == {"experiments": 0, "runs": 0}


def test_fo_ds_needs_a_white_box(smoke_home, tmp_path):
    home, _ = smoke_home
    (target,) = (home / "runs" / "defense" / "targets").glob("*.pt")
    spec = f"exec:{sys.executable} -m applications.certified_defense.example_target --checkpoint {target}"
    line = one_line_error(deepzero("defense", "train", "--preset", "smoke", "--method", "fo-ds", "--target", spec,
                                   home=tmp_path, timeout=300))
    assert "query-only" in line


_NET: list = []          # the classifier behind spy_classifier (built by the test)
_GRAD_SEEN: list = []    # whether autograd was on at each query


def spy_classifier(x):
    """A query-only classifier (loaded by import path) that records autograd's state at every call."""
    _GRAD_SEEN.append(torch.is_grad_enabled() or x.requires_grad)
    return _NET[0](x)


@pytest.mark.parametrize("method", ["zo-ds", "zo-ae-ds"])
def test_zo_trainers_never_backpropagate_into_the_classifier(method, tmp_path, monkeypatch):
    from applications.certified_defense.config import DefenseConfig
    from applications.certified_defense.targets import load_target
    from applications.certified_defense.train import DefenseExperiment
    from core.models import build_model, with_normalize
    from core.runtime.data import load_dataset
    from core.runtime.loop import run_experiment
    from core.runtime.tracking import Tracker

    monkeypatch.setenv("DEEPZERO_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = load_dataset("digits", normalize=False)
    torch.manual_seed(0)
    net = with_normalize(build_model("cnn", depth=2, width=4, in_channels=1, num_classes=10), (data.mean, data.std))
    _NET[:] = [net.eval()]
    _GRAD_SEEN.clear()
    target = load_target(f"{__name__}:spy_classifier", data_shape=data.input_shape, num_classes=10)
    assert target.white_box is None                       # a plain function: query-only
    cfg = DefenseConfig()
    cfg.data.name, cfg.data.train_subset, cfg.data.test_subset, cfg.data.batch_size = "digits", 64, 32, 16
    cfg.denoiser.depth, cfg.denoiser.width, cfg.denoiser.objective = 3, 4, "stab"
    cfg.ae.width, cfg.ae.latent_channels, cfg.ae.downsamples, cfg.ae.epochs = 4, 1, 1, 1
    cfg.zo.sparsity, cfg.zo.q, cfg.zo.grasp_q, cfg.zo.grasp_per_class = 0.5, 4, 4, 1
    cfg.optim.method, cfg.optim.epochs = method, 1
    cfg.validate()
    exp = DefenseExperiment(cfg, data=copy.deepcopy(data), target=target)
    before = {k: v.clone() for k, v in exp.model.state_dict().items()}
    with Tracker("defense") as tr:
        out = run_experiment(exp, tr, progress=False)
    assert out.stopped is None and exp.queries > 0
    assert any(not torch.equal(before[k], v) for k, v in exp.model.state_dict().items())   # D was trained
    assert len(_GRAD_SEEN) >= 5 and not any(_GRAD_SEEN)   # every query ran without autograd
    assert all(p.grad is None for p in net.parameters())
