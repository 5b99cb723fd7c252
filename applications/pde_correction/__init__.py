"""Solver-in-the-loop PDE error correction with a non-differentiable solver: SRC / NON / unrolled-net /
ZO-SOL / FO-SOL (``deepzero pde``)."""
