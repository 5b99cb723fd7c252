"""Black-box PDE solvers behind one protocol (see :mod:`solvers.protocol` for the convention).

Depends on nothing of deepzero's: a solver is a stateless, batched step on NumPy arrays.
"""
from solvers.http import HTTPSolver
from solvers.protocol import Solver, SolverBase, SolverError
from solvers.registry import load, names, register
from solvers.subprocess_solver import SubprocessSolver

__all__ = ["Solver", "SolverBase", "SolverError", "SubprocessSolver", "HTTPSolver", "load", "register", "names"]
