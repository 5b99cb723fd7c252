"""Command-line helpers shared by the applications: one-line errors, common flags, thread setup."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from core.runtime.errors import UserError


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``prog: error: ...``) with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_args(p: argparse.ArgumentParser, presets: list[str], default_preset: str = "default") -> None:
    p.add_argument("--preset", default=default_preset,
                   help=f"named preset ({', '.join(presets)}); default: {default_preset}")
    p.add_argument("--config", metavar="FILE", help="YAML file of config keys, applied after the preset")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config key, e.g. --set train.lr=0.01 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: more threads slow small models down on few cores)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the config's device)")


def setup_torch(threads: int) -> None:
    """One torch thread unless asked otherwise, and the allocator tuned for big temporaries."""
    import torch

    from core.runtime.perf import tune_allocator

    if threads < 1:
        raise UserError(f"--threads must be >= 1; got {threads}")
    torch.set_num_threads(threads)
    tune_allocator()


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available on this machine; use --device cpu")
    return dev


def run_guarded(fn: Callable[[], int | None], prog: str) -> int:
    """Run ``fn``; a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        return int(fn() or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
