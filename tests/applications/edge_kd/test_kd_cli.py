"""``deepzero kd`` end to end: the smoke main job, exact resume, and bad input — on a real MLflow store."""
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import deepzero, one_line_error

TEACHERS = "tests.applications.edge_kd.teachers"
SMALL = ["--set", "data.train_subset=320", "--set", "data.val_size=64", "--set", "data.batch_size=16",
         "--set", "optim.epochs=2", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A real classify checkpoint (backprop, two epochs on 1,024 digits), written by the classify app itself."""
    from applications.classification.cli import main

    home = tmp_path_factory.mktemp("teacher")
    old = os.environ.get("DEEPZERO_HOME")
    os.environ["DEEPZERO_HOME"] = str(home)
    try:
        assert main(["train", "--preset", "smoke", "--set", "optim.method=fo", "--set", "model.depth=3",
                     "--set", "model.width=16", "--set", "optim.epochs=2", "--set", "optim.lr=0.1",
                     "--set", "data.train_subset=1024", "--set", "data.batch_size=32",
                     "--no-progress"]) == 0
    finally:
        os.environ.pop("DEEPZERO_HOME") if old is None else os.environ.__setitem__("DEEPZERO_HOME", old)
    (ckpt,) = (home / "runs" / "classify").glob("*/checkpoint.pt")
    return ckpt


def _kd(*argv):
    from applications.edge_kd.cli import main

    return main(list(argv))


def _client(home: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


def _kd_runs(home: Path):
    client = _client(home)
    exp = client.get_experiment_by_name("deepzero/kd")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _state(path):
    from core.runtime.checkpoint import load_checkpoint

    return load_checkpoint(path, app="kd")


@pytest.mark.parametrize("method,policy,extra", [
    ("fo", "drop", ["--set", "halting.drop_confidence=0.5", "--set", "halting.drop_patience=1"]),
    ("zo-mezo", "freeze", ["--set", "halting.freeze_tol=1.0", "--set", "optim.lr=0.001"]),
])
def test_resume_reaches_what_an_uninterrupted_run_reaches(store, teacher, method, policy, extra):
    from applications.edge_kd.cli import _flag_overrides, _parser
    from applications.edge_kd.config import PRESET_DIR, RESUME_SAFE, KDAppConfig
    from applications.edge_kd.train import KDExperiment
    from core.runtime.cli import train_command

    args = ["train", "--teacher", str(teacher), "--method", method, "--halting", policy, *SMALL, *extra]
    assert _kd(*args) == 0
    (straight,) = (store / "runs" / "kd").glob("*/checkpoint.pt")

    def ctrl_c_after_first_epoch(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    parsed = _parser("deepzero kd").parse_args(args)
    with pytest.raises(KeyboardInterrupt):                     # the real CLI path, interrupted after epoch 1
        train_command(parsed, schema=KDAppConfig, preset_dir=PRESET_DIR, experiment=KDExperiment, prog="kd",
                      extra_overrides=_flag_overrides(parsed), safe_keys=RESUME_SAFE,
                      on_epoch=ctrl_c_after_first_epoch)
    (killed,) = [p for p in (store / "runs" / "kd").glob("*/checkpoint.pt") if p != straight]
    assert _state(killed)["epoch"] == 1
    assert _kd("train", "--resume", str(killed), "--no-progress") == 0
    a, b = _state(straight), _state(killed)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    keys = ("test_accuracy", "val_accuracy", "train_flops", "teacher_queries", "active_samples", "frozen_units",
            "train_loss")
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    sa, sb = a["app_state"], b["app_state"]
    assert torch.equal(sa["cache"]["logits"], sb["cache"]["logits"]) and sa["frozen"] == sb["frozen"]
    assert a["blackboxes"]["teacher"]["queries"] == b["blackboxes"]["teacher"]["queries"] == 256
    if policy == "drop":
        assert torch.equal(sa["policy"]["kept"], sb["policy"]["kept"]) and not bool(sa["policy"]["kept"].all())
    else:
        depth = a["model_spec"]["kwargs"]["depth"]
        assert sa["frozen"] == depth                             # every block frozen after epoch 1; the head trains
    run = _client(store).get_run(b["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["peak_step_memory_bytes"] > 0
    assert len(_client(store).get_metric_history(b["mlflow_run_id"], "test_accuracy")) == 2


def _one_line(capsys, code):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], (code, err)
    return err[0]


def test_bad_input_is_one_line_and_opens_no_run(store, teacher, capsys, tmp_path):
    from core.runtime.checkpoint import save_checkpoint

    base = ["train", "--teacher", str(teacher), *SMALL]
    wrong = save_checkpoint(tmp_path / "denoiser.pt", {"app": "defense", "model": {}, "model_spec": None})
    profile = tmp_path / "broken.yaml"
    profile.write_text("name: broken\nstorage_bytes: 1000\nram_bytes: -5\nflops_per_s: 1.0e+9\nmax_latency_s: 0.001\n"
                       "bytes_per_param: 4\n")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("name: tiny\nstorage_bytes: 100\nram_bytes: 100000\nflops_per_s: 1.0e+9\nmax_latency_s: 0.001\n"
                    "bytes_per_param: 4\n")
    cases = [
        (base + ["--set", "kd.temperature=0"], "config key 'kd.temperature' must be > 0; got 0.0"),
        (base + ["--set", "kd.alpha=1.5"], "config key 'kd.alpha' must be in [0, 1]; got 1.5"),
        (base + ["--device", str(profile)], "'ram_bytes' must be a positive number; got -5"),
        (base + ["--device", "raspberry"], "unknown device profile 'raspberry'"),
        (base + ["--device", str(tiny)], "no student fits device profile 'tiny': even the smallest (cnn depth 1, "
                                         "width 8) needs storage"),
        (["train", "--teacher", str(wrong), *SMALL], "was written by app 'defense'; a teacher is a checkpoint of "
                                                     "'deepzero classify train'"),
        (["train", *SMALL], "no teacher given"),
        (["train", "--teacher", f"{TEACHERS}:unreachable", *SMALL], "ConnectionError: teacher API at 10.0.0.7:9000"),
        (["train", "--teacher", f"{TEACHERS}:three_classes", *SMALL], "returned (64, 3)"),
        (["train", "--teacher", "no_such_pkg.mod:fn", *SMALL], "cannot import teacher no_such_pkg.mod:fn"),
        (["design", "--teacher", str(teacher), "--device", str(tiny)], "no student fits"),
        (["design", "--teacher", str(teacher), "--set", "halting.policy=sometimes"], "must be one of none, plateau"),
        (["export", str(teacher)], "was written by app 'classify', not 'kd'"),
        (["run", "--set", "sweep.methods=fo,sgd"], "config key 'sweep.methods' must be comma-separated names"),
        (base + ["--set", "halting.rho=1.5"], "config key 'halting.rho' must be in [0, 1]"),
        (["train", "--teacher", f"{TEACHERS}:ThreeChannelNet", *SMALL], "fails on [1, 28, 28] images: RuntimeError"),
        # kd run asks the teacher before any run opens: a teacher that cannot answer leaves nothing
        (["run", "--teacher", f"{TEACHERS}:unreachable", "--preset", "smoke", "--no-progress"],
         "ConnectionError: teacher API at 10.0.0.7:9000"),
    ]
    for argv, expected in cases:
        line = _one_line(capsys, _kd(*argv))
        assert expected in line, (argv, line)
    assert _kd_runs(store) == []                                  # nothing half-made


def test_a_teacher_failing_mid_training_stops_the_run_in_one_line(store, capsys):
    code = _kd("train", "--teacher", f"{TEACHERS}:FailsDuringTraining", *SMALL)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "INFO mlflow" not in line]
    assert code == 1 and len(err) == 1, err
    assert "stopped: the teacher (query-only" in err[0] and "TimeoutError: teacher API timed out" in err[0]
    assert "no epoch had finished" in err[0]
    (run,) = _kd_runs(store)
    assert "TimeoutError" in run.data.tags["deepzero.stop_reason"]


def test_smoke_main_job_through_the_cli(tmp_path):
    proc = deepzero("kd", "run", "--preset", "smoke", "--no-progress", home=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ONNX vs PyTorch" in proc.stdout
    client = _client(tmp_path)
    runs = _kd_runs(tmp_path)
    (parent,) = [r for r in runs if r.info.run_name == "kd-run"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {f"{m}-{p}" for m in ("fo", "zo-mezo") for p in ("none", "plateau", "drop", "teacher",
                                                                             "freeze")} | {"zo-cge-none"}
    for child in children.values():
        assert child.info.status == "FINISHED" and child.data.tags["seed"] == "0"
        wanted = {"test_accuracy", "train_flops", "teacher_queries", "peak_step_memory_bytes"}
        assert wanted <= set(child.data.metrics)
    assert children["fo-none"].data.metrics["test_accuracy"] > 0.2                 # chance is 0.1
    # forward-only MeZO needs less memory per step than backprop, measured in the same run
    assert parent.data.metrics["memory_ratio_zo-mezo_vs_fo"] < 1.0
    assert parent.data.metrics["onnx_max_abs_diff"] <= 1e-5
    arts = {a.path for d in ("plots", "export", "kd") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"plots/accuracy_vs_flops.png", "plots/accuracy_vs_wall_time.png", "plots/memory_per_step.png",
            "export/student.onnx", "export/constraints.tsv", "kd/table.tsv"} <= arts
    onnx_file = client.download_artifacts(parent.info.run_id, "export/student.onnx", str(tmp_path))
    from applications.edge_kd.export import session

    logits = session(onnx_file).run(None, {"x": torch.rand(3, 1, 28, 28).numpy()})[0]
    assert logits.shape == (3, 10)
    table = client.download_artifacts(parent.info.run_id, "kd/table.tsv", str(tmp_path))
    rows = Path(table).read_text().splitlines()
    assert "flops_saved" in rows[0] and len(rows) == 1 + 11
    classify = client.get_experiment_by_name("deepzero/classify")        # the teacher: a classify run of its own
    assert len(client.search_runs([classify.experiment_id])) == 1
    assert one_line_error(deepzero("kd", "run", "--preset", "smoke", "--set", "kd.alpha=2", home=tmp_path))
