"""`python -m gfs ...` runs the `gfs` command."""

import sys

from gfs.cli import main

sys.exit(main())
