"""Redraws the comparison's report (results.md and the PNG plots) from its results.json: flashjax.bench.report.

    python benchmarks/report.py results.json --out DIR      # (re)writes DIR/results.md and the PNGs
"""

import sys

from flashjax.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
