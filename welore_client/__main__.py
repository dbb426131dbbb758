"""`python -m welore_client jobs list` — the client commands without the `welore` front end."""

import sys

from .cli import main

sys.exit(main())
