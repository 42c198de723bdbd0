"""python -m gfs.experiments study pretraining|singular-values [...]"""

import sys

from .cli import main

sys.exit(main())
