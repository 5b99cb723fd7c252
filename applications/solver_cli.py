"""``deepzero solver {check,serve}``: vet a black-box solver, or expose one over loopback HTTP."""
from __future__ import annotations

import sys

from core.runtime.cli import Parser, run_guarded
from core.runtime.errors import UserError


def _load(spec: str, options: list[str], timeout: float):
    from solvers import SolverError, load
    from solvers.registry import parse_options

    try:
        opts = parse_options(options)
        if spec.startswith(("exec:", "http://", "https://")):
            opts.setdefault("timeout", timeout)
        return load(spec, **opts)
    except SolverError as exc:
        raise UserError(str(exc)) from None


def main(argv: list[str] | None = None, prog: str = "deepzero solver") -> int:
    p = Parser(prog=prog, description="Vet or serve a black-box PDE solver.")
    sub = p.add_subparsers(dest="verb", metavar="{check,serve}", parser_class=Parser)
    sub.required = True
    c = sub.add_parser("check", help="run a few steps: shape, dtype, determinism, per-sample time")
    c.add_argument("spec", help="burgers | wake | package.module:Class | exec:COMMAND | http://URL")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="solver option")
    c.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                   help="a condition value for every sample, e.g. re=500")
    c.add_argument("--batch", default="1,8,32", help="batch sizes to time (default 1,8,32)")
    c.add_argument("--timeout", type=float, default=60.0, help="per-call timeout for external solvers")
    s = sub.add_parser("serve", help="expose a solver over HTTP (UM-Bridge style) on 127.0.0.1")
    s.add_argument("--solver", required=True, help="burgers | wake | package.module:Class | exec:COMMAND")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    s.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def check() -> int:
        from solvers import SolverError
        from solvers.check import check as run_check
        from solvers.check import format_report
        from solvers.registry import parse_options

        try:
            sizes = tuple(int(b) for b in args.batch.split(","))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            raise UserError(f"--batch must be comma-separated positive integers, e.g. 1,8,32; got '{args.batch}'")
        if args.timeout <= 0:
            raise UserError(f"--timeout must be > 0 seconds; got {args.timeout}")
        try:
            conditions = parse_options(args.condition)
        except SolverError as exc:
            raise UserError(str(exc).replace("solver option", "--condition")) from None
        for name, value in conditions.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"--condition {name}={value!r}: a condition must be a number, e.g. re=500")
        solver = _load(args.spec, args.option, args.timeout)
        try:
            report = run_check(solver, batch_sizes=sizes, conditions=conditions)
        except SolverError as exc:
            raise UserError(str(exc)) from None
        finally:
            solver.close()
        print(format_report(args.spec, report), end="")
        return 0 if report["deterministic"] else 1

    def serve() -> int:
        from solvers import SolverError
        from solvers.http import make_server

        if not 0 <= args.port < 65536:
            raise UserError(f"--port must be in 0..65535; got {args.port}")
        if args.timeout <= 0:
            raise UserError(f"--timeout must be > 0 seconds; got {args.timeout}")
        solver = _load(args.solver, args.option, args.timeout)
        try:
            server = make_server(solver, args.host, args.port, allow_remote=args.allow_remote)
        except SolverError as exc:
            solver.close()
            raise UserError(str(exc)) from None
        except OSError as exc:
            solver.close()
            raise UserError(f"cannot bind {args.host}:{args.port}: {exc.strerror or exc}") from None
        host, port = server.server_address[:2]
        print(f"serving {args.solver} on http://{host}:{port} (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            solver.close()
        return 0

    return run_guarded({"check": check, "serve": serve}[args.verb], f"{prog} {args.verb}")
