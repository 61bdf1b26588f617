"""Run the command line with `python -m relaymail`."""

import sys

from .cli import main

sys.exit(main())
