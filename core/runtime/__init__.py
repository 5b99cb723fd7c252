"""Experiment runtime shared by every application: config, tracking, checkpoints, data, seeding.

Submodules are imported on demand so that light callers (the CLI's ``--help``) stay fast.
"""
from core.runtime.errors import UserError

__all__ = ["UserError"]
