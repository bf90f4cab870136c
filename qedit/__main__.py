"""`python -m qedit`: the command line."""
import sys

from qedit.cli.main import main

sys.exit(main())
