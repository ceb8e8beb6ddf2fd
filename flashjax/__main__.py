"""`python -m flashjax ...`: the same command line as the `flashjax` script."""

import sys

from flashjax.cli import main

sys.exit(main())
