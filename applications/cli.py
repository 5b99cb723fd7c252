"""The ``deepzero`` command: ``deepzero <app> <verb> [--config FILE] [--set key=value ...]``.

Imports are lazy: ``deepzero --help`` must answer without importing torch or mlflow.
"""
from __future__ import annotations

import sys

# app name -> (module with main(argv, prog), one-line description, key metrics `deepzero runs` shows)
APPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "classify": ("applications.classification.cli",
                 "ZO training from scratch (CGE/RGE/MeZO/FO), ZO-GraSP pruning, the CGE-vs-RGE-vs-FO study",
                 ("test_accuracy", "train_loss", "queries", "wall_time_s")),
    "defense": ("applications.certified_defense.cli",
                "certified defense of a query-only classifier: denoised smoothing by FO-DS / ZO-AE-DS / ZO-DS",
                ("noisy_accuracy", "certified_accuracy_r0.25", "acr", "queries")),
    "pde": ("applications.pde_correction.cli",
            "solver-in-the-loop PDE correction through a black-box solver: SRC / NON / unrolled / ZO-SOL / FO-SOL",
            ("mae", "mae_final", "queries", "wall_time_s")),
    "kd": ("applications.edge_kd.cli",
           "edge knowledge distillation: device-designed student, KD by FO or ZO, early halting, ONNX check",
           ("test_accuracy", "train_flops", "teacher_queries", "wall_time_s")),
    "solver": ("applications.solver_cli", "vet (check) or expose (serve) a black-box PDE solver", ()),
}
TOOLS: dict[str, str] = {
    "ui": "open the MLflow UI on the project's tracking store (127.0.0.1)",
    "runs": "print recent runs as a table",
}

USAGE = """usage: deepzero <command> [args...]

Zeroth-order deep learning: training without backpropagation.

applications:
{apps}

tools:
{tools}

Run 'deepzero <command> --help' for a command's verbs and options.
"""


def _help() -> str:
    apps = "\n".join(f"  {name:<10} {desc}" for name, (_, desc, _m) in APPS.items())
    tools = "\n".join(f"  {name:<10} {desc}" for name, desc in TOOLS.items())
    return USAGE.format(apps=apps, tools=tools)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help(), end="")
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"deepzero {version('deepzero')}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in TOOLS:
        from applications import tools

        return getattr(tools, f"{cmd}_main")(rest)
    if cmd not in APPS:
        allowed = ", ".join([*APPS, *TOOLS])
        print(f"deepzero: error: unknown command '{cmd}'; available: {allowed}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(APPS[cmd][0])
    return module.main(rest, prog=f"deepzero {cmd}")


if __name__ == "__main__":
    sys.exit(main())
