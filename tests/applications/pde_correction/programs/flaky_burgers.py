"""An external Burgers solver for the tests that crashes at its N-th step call while a flag file exists.

    python flaky_burgers.py N FLAG_FILE [n=16 ...]
"""
import os
import sys

from solvers.burgers import Burgers
from solvers.registry import parse_options
from solvers.wire import serve


class Flaky:
    def __init__(self, crash_at: int, flag: str, options: dict):
        self.inner, self.crash_at, self.flag, self.calls = Burgers(**options), crash_at, flag, 0
        self.state_shape, self.dtype, self.conditions = self.inner.state_shape, self.inner.dtype, ("forcing",)

    def step(self, state, **conditions):
        self.calls += 1
        if self.calls >= self.crash_at and os.path.exists(self.flag):
            print(f"flaky solver: crashing at call {self.calls}", file=sys.stderr, flush=True)
            os._exit(3)
        return self.inner.step(state, **conditions)


if __name__ == "__main__":
    solver = Flaky(int(sys.argv[1]), sys.argv[2], parse_options(sys.argv[3:]))
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    sys.exit(serve(solver, sys.stdin.buffer, out))
