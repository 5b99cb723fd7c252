import sys

from applications.certified_defense.cli import main

sys.exit(main())
