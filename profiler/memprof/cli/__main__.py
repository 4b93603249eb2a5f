"""python -m memprof.cli: the memprof command."""
import sys

from . import main

sys.exit(main())
