import sys

from applications.classification.cli import main

sys.exit(main(sys.argv[1:], prog="deepzero classify"))
