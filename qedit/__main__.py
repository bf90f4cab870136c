"""`python -m qedit`: the command line."""
import sys

from qedit.cli import main

sys.exit(main())
