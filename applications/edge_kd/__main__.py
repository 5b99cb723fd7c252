"""Edge knowledge distillation: ``python -m applications.edge_kd`` is ``deepzero kd``."""
import sys

from applications.edge_kd.cli import main

sys.exit(main(sys.argv[1:], prog="deepzero kd"))
