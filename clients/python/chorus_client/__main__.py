"""`python -m chorus_client chat ...`: see cli.py."""

import sys

from chorus_client.cli import main

sys.exit(main())
