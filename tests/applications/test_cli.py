import subprocess
import sys

from tests.helpers import ROOT, deepzero, one_line_error


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, io, contextlib\nfrom applications.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out: rc = main(['--help'])\n"
            "heavy = [m for m in ('torch', 'mlflow', 'torchvision', 'numpy') if m in sys.modules]\n"
            "print(rc, heavy, 'classify' in out.getvalue() and 'runs' in out.getvalue())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "0 [] True", proc.stderr


def test_unknown_command_and_verb_are_one_line(tmp_path):
    assert "unknown command 'fly'" in one_line_error(deepzero("fly", home=tmp_path))
    assert "invalid choice: 'fly'" in one_line_error(deepzero("classify", "fly", home=tmp_path))


def test_runs_table_on_empty_and_filled_store(tmp_path):
    proc = deepzero("runs", home=tmp_path)
    assert proc.returncode == 0 and "no runs yet" in proc.stdout
    from core.runtime.tracking import Tracker
    import os

    os.environ["DEEPZERO_HOME"] = str(tmp_path)
    try:
        with Tracker("classify", run_name="tabled") as tr:
            tr.log_metrics({"test_accuracy": 0.875})
    finally:
        del os.environ["DEEPZERO_HOME"]
    proc = deepzero("runs", "--app", "classify", "--limit", "5", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tr.run_id in proc.stdout and "test_accuracy=0.875" in proc.stdout and "FINISHED" in proc.stdout
    assert "no runs for app 'pde'" in one_line_error(deepzero("runs", "--app", "pde", home=tmp_path))


def test_ui_rejects_a_bad_port(tmp_path):
    assert "--port must be in 1..65535" in one_line_error(deepzero("ui", "--port", "70000", home=tmp_path))


def test_mlflow_folder_does_not_shadow_the_library():
    proc = subprocess.run([sys.executable, "-c", "import mlflow; print(mlflow.__file__, mlflow.__version__)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "site-packages" in proc.stdout and "3.17.2" in proc.stdout
    assert not (ROOT / "mlflow" / "__init__.py").exists()
