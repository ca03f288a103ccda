import sys

from kvbound.cli import main

sys.exit(main())
