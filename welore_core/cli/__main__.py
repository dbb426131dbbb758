"""`python -m welore_core.cli` runs the `welore` command."""

import sys

from . import main

sys.exit(main())
