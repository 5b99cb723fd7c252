"""Every verb of every command, driven with malformed arguments: one line, exit 2, no traceback, no run.

The verbs are discovered from the commands' own ``--help``, so a verb added later is covered too.
The sweep runs the CLI's ``main`` in this process (a subprocess per case cost ~3 s of start-up
each); the final "no runs" check and the solver cases run the real command in a subprocess.
"""
import re

import pytest

from applications.cli import APPS, TOOLS
from tests.helpers import deepzero, deepzero_in_process, one_line_error


def _verbs(home, app):
    proc = deepzero_in_process(app, "--help", home=home)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"\{([a-z_,-]+)\}", proc.stdout)
    return m.group(1).split(",") if m else []


def _options(home, *cmd):
    proc = deepzero_in_process(*cmd, "--help", home=home)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _positionals(help_text):
    """Dummy values for a verb's positional arguments (a path that does not exist)."""
    m = re.search(r"positional arguments:\n(.*?)\n\n", help_text, re.S)
    names = re.findall(r"^  (\S+)", m.group(1), re.M) if m else []
    return ["/nonexistent/input" for _ in names]


def test_every_verb_rejects_malformed_arguments_in_one_line(tmp_path):
    cases = []
    for app in APPS:
        for verb in _verbs(tmp_path, app):
            help_text = _options(tmp_path, app, verb)
            cases.append(((app, verb, "--no-such-flag"), f"deepzero {app} {verb} --help"))
            verb = (verb, *_positionals(help_text))
            if "--set" in help_text:
                cases.append(((app, *verb, "--set", "nokey"), "expected key=value"))
                cases.append(((app, *verb, "--set", "bogus.key=1"), "unknown config key 'bogus"))
                cases.append(((app, *verb, "--preset", "no-such-preset"), "unknown preset"))
            if "--threads" in help_text:
                cases.append(((app, *verb, "--threads", "0"), "--threads must be >= 1"))
            if "--device" in help_text:
                cases.append(((app, *verb, "--device", "tpu9"), "unknown device"))
            if "--resume" in help_text:
                cases.append(((app, *verb, "--resume", str(tmp_path / "missing.pt")), "does not exist"))
    for tool in TOOLS:
        cases.append(((tool, "--no-such-flag"), f"deepzero {tool} --help"))
    cases.append((("runs", "--format", "xml"), "--format must be one of"))
    cases.append((("runs", "--limit", "0"), "--limit must be >= 1"))
    cases.append((("ui", "--port", "0"), "--port must be in 1..65535"))
    assert len(cases) > 15
    for args, expected in cases:
        line = one_line_error(deepzero_in_process(*args, home=tmp_path))
        assert expected in line, (args, line)
    # nothing half-made is left behind: no MLflow run was opened by any of them
    proc = deepzero("runs", home=tmp_path, timeout=60)
    assert proc.returncode == 0 and "no runs yet" in proc.stdout, proc.stdout


@pytest.mark.parametrize("args,expected", [
    (("solver", "check", "burgers", "--condition", "re=abc"), "a condition must be a number"),
    (("solver", "check", "burgers", "--batch", "0"), "--batch must be comma-separated positive integers"),
    (("solver", "check", "burgers", "--batch", "a,b"), "--batch must be comma-separated positive integers"),
    (("solver", "check", "no_such_solver"), "no_such_solver"),
])
def test_solver_check_mistakes(tmp_path, args, expected):
    assert expected in one_line_error(deepzero(*args, home=tmp_path, timeout=120))
