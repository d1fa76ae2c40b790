"""python -m otofx: the command line."""
import sys

from otofx.cli import main

sys.exit(main())
