#!/usr/bin/env bash
# Runs flashjax on the CPU: checks JAX sees it, generates with the default model (dense and under a
# memory budget), and runs the dense and flash benchmarks. Results go to the folder given (default
# ./results-cpu). Usage: scripts/run_cpu.sh [OUT_DIR] [MODEL]
set -euo pipefail
out=${1:-results-cpu}
model=${2:-smollm2}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$here"

# Keep an installed JAX that already runs on the CPU; otherwise install the project (CPU JAX).
if ! python -c "import jax, flashjax; assert jax.devices('cpu')" 2>/dev/null; then
  pip install -e ".[bench]"
fi
python - <<'PY'
import jax
print("flashjax: JAX", jax.__version__, "devices:", jax.devices())
PY

flash="$out/model-flash"
[ -f "$flash/manifest.json" ] || flashjax convert "$model" "$flash"
flashjax generate --model "$model" --prompt "The history of the printing press" --max-tokens 64 --json \
  | tail -n 1 > "$out/generate_dense.json"
flashjax generate --model "$flash" --memory-budget 65% --verbose --prompt "The history of the printing press" \
  --max-tokens 64 --json | tail -n 1 > "$out/generate_flash_65.json"
python benchmarks/bench_dense.py --model "$model" --runs 3 --out "$out/bench_dense.json"
python benchmarks/bench_flash.py --model "$model" --budgets 50% 65% --new-tokens 128 --workdir "$out/bench-models" \
  --out "$out/bench_flash.json"
echo "flashjax: results in $out" >&2
