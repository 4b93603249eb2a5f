"""python -m memprof.cli: the memprof command."""
from . import console_main

console_main()
