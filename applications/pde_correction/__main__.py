import sys

from applications.pde_correction.cli import main

sys.exit(main())
