import sys

from applications.cli import main

sys.exit(main())
