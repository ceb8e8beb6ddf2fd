"""flashjax beside transformers, accelerate and llama.cpp: `flashjax bench` (flashjax.bench.compare) with
this repository's shared calibration text.

Takes every option of `flashjax bench` (see `--help`). When this checkout sits beside the shared data
(../shared/data), the predictors are calibrated on calib_git_relnotes.txt unless --calibration-text says
otherwise; without it, this is exactly `flashjax bench`. The prompt is the same either way: the prose
shipped in the package (flashjax/bench/data/prompt.txt) unless --prompt-text is given, so a figure
measured here can be reproduced from the repository alone; the results record its file and sha256.

    python benchmarks/bench_compare.py --out benchmarks/results/compare            # the full run
    python benchmarks/bench_compare.py --quick --out /tmp/bench-quick                # CI smoke: a few minutes
    python benchmarks/bench_compare.py --model path/to/model.gguf --budgets 50% --new-tokens 64
"""

from __future__ import annotations

import pathlib
import sys

from flashjax.bench.compare import main

SHARED_DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_TEXTS = (("--calibration-text", SHARED_DATA / "calib_git_relnotes.txt"),)


def with_shared_texts(argv: list[str]) -> list[str]:
    """argv after the shared text files for the text options (when the files exist): an option the
    command line gives itself comes later and wins."""
    extra = []
    for flag, path in DEFAULT_TEXTS:
        if path.is_file() and not any(a == flag or a.startswith(flag + "=") for a in argv):
            extra += [flag, str(path)]
    return extra + list(argv)


if __name__ == "__main__":
    sys.exit(main(with_shared_texts(sys.argv[1:]), prog="python benchmarks/bench_compare.py"))
