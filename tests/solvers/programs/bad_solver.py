"""A misbehaving solver program for the tests: crash | hang | nan | shape | dtype | good (per argv[1])."""
import sys
import time

import numpy as np

from solvers.wire import serve


class Bad:
    state_shape, dtype, conditions = (4,), np.dtype(np.float64), ()

    def __init__(self, mode):
        self.mode = mode

    def step(self, state):
        print(f"bad solver: step in mode {self.mode}", file=sys.stderr, flush=True)
        if self.mode == "crash":
            print("segfault-like failure in the solver core", file=sys.stderr, flush=True)
            sys.exit(3)
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "nan":
            return np.full_like(state, np.nan)
        if self.mode == "shape":
            return np.zeros((state.shape[0], 5))
        if self.mode == "dtype":
            return state.astype(np.float32)
        return state * 2


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "nohandshake":
        time.sleep(3600)
    if mode == "spawn":   # leaves a grandchild behind unless its process group is killed
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"grandchild {child.pid}", file=sys.stderr, flush=True)
        mode = "hang"
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    sys.exit(serve(Bad(mode), sys.stdin.buffer, out))
