"""Cold random-read throughput of the disk by chunk size and reads in flight: flashjax.bench.disk_probe.

    python benchmarks/disk_probe.py --dir /path/on/the/model/disk [--size-mib 1024] [--json]
"""

import sys

from flashjax.bench.disk_probe import main

if __name__ == "__main__":
    sys.exit(main())
