"""Example external solver program: serves any registered solver over the deepzero wire format.

Copy this file to wrap your own simulator: replace ``build_solver`` with code that constructs an
object with ``state_shape``, ``dtype`` and ``step(state, **conditions)``, and keep ``main``. Run::

    python -m solvers.example_server --solver burgers --option n=64

deepzero starts it with ``SubprocessSolver([...command...])`` or the solver spec
``exec:python -m solvers.example_server --solver burgers`` (e.g. ``deepzero solver check "exec:..."``);
stdout carries only protocol frames, so print diagnostics to stderr.
"""
from __future__ import annotations

import argparse
import sys


def build_solver(name: str, options: list[str]):
    from solvers.registry import load, parse_options

    return load(name, **parse_options(options))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a deepzero solver on stdin/stdout.")
    p.add_argument("--solver", default="burgers", help="registered name or package.module:Class")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="solver option")
    args = p.parse_args(argv)
    solver = build_solver(args.solver, args.option)
    stdout = sys.stdout.buffer
    sys.stdout = sys.stderr          # stray prints must not corrupt the frame stream
    from solvers.wire import serve

    return serve(solver, sys.stdin.buffer, stdout)


if __name__ == "__main__":
    sys.exit(main())
