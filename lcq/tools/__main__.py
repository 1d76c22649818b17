"""`python -m lcq.tools COMMAND ...` is `lcq COMMAND ...` (lcq/tools/cli.py)."""
import sys

from .cli import main

sys.exit(main())
