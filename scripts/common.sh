# shellcheck shell=bash
# Shared by run_cpu.sh, run_gpu.sh and run_tpu.sh (sourced, not run): JAX for the platform, the
# device check, the generations, a summary of the flash benchmark. Expects ROOT (the repository).

PYTHON=${PYTHON:-python}
STEPS=${STEPS:-}  # empty: every step; else the steps to run, e.g. "generate cold"

log() { echo "flashjax: $*" >&2; }

# step NAME: true when NAME is one of $STEPS (or $STEPS is empty). The device check is not a step: it always runs.
step() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }

# The flashjax command, through the interpreter: works before (or without) its console script.
flashjax() { "$PYTHON" -m flashjax.cli "$@"; }

# out_dir DIR: creates DIR and prints its absolute path.
out_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

sees() { "$PYTHON" -c "import jax, sys; sys.exit(0 if jax.devices('$1') else 1)" >/dev/null 2>&1; }

# ensure_jax PLATFORM JAX_SPEC [EXTRAS]: keeps an installed JAX that already sees PLATFORM (no
# network needed); otherwise installs the project (with EXTRAS, e.g. "[bench]") and JAX_SPEC. Then
# installs flashjax itself if it is not (--no-deps: offline when JAX, flax, orbax and tensorstore are
# present), and its other dependencies if they are missing (this needs the network; JAX stays).
ensure_jax() {
  local platform=$1 spec=$2 extras=${3:-}
  if sees "$platform"; then
    log "keeping the installed JAX: it sees the $platform"
  else
    log "no installed JAX sees the $platform: installing flashjax$extras and $spec"
    "$PYTHON" -m pip install -e "$ROOT$extras"
    "$PYTHON" -m pip install -U "$spec"
  fi
  if ! "$PYTHON" -I -c "import flashjax" >/dev/null 2>&1; then  # -I: installed, not found in the cwd
    log "installing flashjax itself (--no-deps)"
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e "$ROOT" \
      || "$PYTHON" -m pip install --no-deps -e "$ROOT" \
      || { log "could not install flashjax; running it from $ROOT"; export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; }
  fi
  if ! "$PYTHON" -c "import flax, optax, orbax.checkpoint, tensorstore, tokenizers, gguf" >/dev/null 2>&1; then
    log "installing flashjax's missing dependencies"
    "$PYTHON" -m pip install -e "$ROOT$extras"
  fi
}

# require_device PLATFORM HINT: prints the devices; exits with HINT unless JAX sees PLATFORM and
# computes on it by default.
require_device() {
  "$PYTHON" - "$1" "$2" <<'PY'
import sys

platform, hint = sys.argv[1:]
try:
    import jax
    devices = jax.devices(platform)
except Exception as e:  # no backend for the platform, or no devices
    sys.exit(f"flashjax: JAX sees no {platform} device ({str(e).splitlines()[0]}). {hint}")
print(f"flashjax: JAX {jax.__version__}, default backend {jax.default_backend()}, "
      f"{len(devices)} {platform} device(s): {devices}", file=sys.stderr)
if jax.default_backend() != platform:
    sys.exit(f"flashjax: JAX computes on {jax.default_backend()} by default, not {platform}; "
             f"set JAX_PLATFORMS={platform}")
PY
}

# engine_flags: --devices / --host-cache when DEVICES / HOST_CACHE are set (flashjax generate, bench_flash.py).
engine_flags() {
  local flags=()
  [ -n "${DEVICES:-}" ] && flags+=(--devices "$DEVICES")
  [ -n "${HOST_CACHE:-}" ] && flags+=(--host-cache "$HOST_CACHE")
  echo "${flags[@]}"
}

# generations OUT MODEL BUDGET MAX_TOKENS: a dense and a flash generation (the model converted to
# OUT/model-flash once), each one JSON object in OUT/generate_{dense,flash}.json.
generations() {
  local out=$1 model=$2 budget=$3 max_tokens=$4 prompt="The history of the printing press"
  local flash="$out/model-flash"
  [ -f "$flash/manifest.json" ] || flashjax convert "$model" "$flash"
  log "dense generation ($model)"
  flashjax generate --model "$model" --prompt "$prompt" --max-tokens "$max_tokens" --json \
    | tail -n 1 > "$out/generate_dense.json"
  log "flash generation ($flash, memory budget $budget)"
  # shellcheck disable=SC2046  # engine_flags is a list of words
  flashjax generate --model "$flash" --memory-budget "$budget" $(engine_flags) --verbose --prompt "$prompt" \
    --max-tokens "$max_tokens" --json | tail -n 1 > "$out/generate_flash.json"
  "$PYTHON" - "$out/generate_dense.json" "$out/generate_flash.json" <<'PY'
import json, sys

dense, flash = (json.load(open(p)) for p in sys.argv[1:])
print(f"flashjax: dense {dense['stats']['decode_ms_per_token']:.1f} ms/token, flash "
      f"{flash['stats']['decode_ms_per_token']:.1f} ms/token; same tokens: {dense['tokens'] == flash['tokens']}",
      file=sys.stderr)
PY
}

# summarize BENCH_FLASH_JSON...: each row's latency, split and bound; the speedup over naive.
summarize() {
  "$PYTHON" - "$@" <<'PY'
import json, sys

for path in sys.argv[1:]:
    r = json.load(open(path))
    t = r["throughput"]
    print(f"{path}: {r['model']} on {r['machine'].get('jax_backend')}, "
          f"{'cold reads from disk' if r['cold_page_cache'] else 'warm page cache'}, host cache {r.get('host_cache')}; "
          f"disk {t['disk_bytes_per_s'] / 1e9:.2f} GB/s, host->device {t['h2d_bytes_per_s'] / 1e9:.2f} GB/s")
    for row in r["rows"]:
        if "error" in row:
            print(f"  [{row['memory_budget']}] {row['config']}: skipped ({row['error']})")
            continue
        ratio = row["ratio_to_bound"]
        print(f"  [{row['memory_budget']}] {row['config']}: {row['decode_ms_per_token']:.1f} ms/token "
              f"(I/O {row['io_ms']:.1f}, memory management {row['memory_management_ms']:.1f}, compute {row['compute_ms']:.1f}); "
              f"bound {row['bound_ms_per_token']:.2f} ms" + ("" if ratio is None else f", {ratio:.2f}x the bound"))
    for budget, x in r["speedup_vs_naive"].items():
        print(f"  [{budget}] oracle + windowing + bundling is {x:.1f}x faster than naive")
PY
}

# synthetic_benchmarks OUT SHAPE WORKDIR: builds the synthetic SHAPE model in WORKDIR (bundled and
# not, once), then bench_flash.py on it: the model on disk, cold ("cold" step: bench_flash_disk.json),
# and host RAM as the slow tier ("warm" step: --warm --host-cache, bench_flash_host.json); then a
# summary. Knobs: ACTIVE, BUDGETS, PROMPT_TOKENS, NEW_TOKENS, CONFIGS, WARM_HOST_CACHE, DEVICES, HOST_CACHE.
synthetic_benchmarks() {
  local out=$1 shape=$2 workdir=$3 kind configs layout results=()
  if step build; then
    for kind in bundled unbundled; do  # naive and the unbundled rows read the unbundled copy
      [ -f "$workdir/$kind/manifest.json" ] && continue
      layout=(); [ "$kind" = bundled ] || layout=(--no-bundle)
      log "writing the synthetic $shape model ($kind) to $workdir/$kind"
      "$PYTHON" benchmarks/synthetic.py "$workdir/$kind" --shape "$shape" --active "${ACTIVE:-0.03}" \
        ${layout[@]+"${layout[@]}"}
    done
  fi
  IFS=, read -ra configs <<< "${CONFIGS:-naive,oracle + windowing,oracle + windowing + bundling}"
  # shellcheck disable=SC2206  # BUDGETS is a list of words
  local bench=(--synthetic "$shape" --active "${ACTIVE:-0.03}" --workdir "$workdir" --budgets ${BUDGETS:-50%}
               --prompt-tokens "${PROMPT_TOKENS:-128}" --new-tokens "${NEW_TOKENS:-32}" --configs "${configs[@]}"
               ${DEVICES:+--devices "$DEVICES"})
  if step cold; then
    log "benchmark: the model on disk, page cache evicted before every token"
    "$PYTHON" benchmarks/bench_flash.py "${bench[@]}" ${HOST_CACHE:+--host-cache "$HOST_CACHE"} \
      --out "$out/bench_flash_disk.json" | tee "$out/bench_flash_disk.md"
    results+=("$out/bench_flash_disk.json")
  fi
  if step warm; then
    log "benchmark: host RAM as the slow tier (--warm --host-cache ${WARM_HOST_CACHE:-100%})"
    "$PYTHON" benchmarks/bench_flash.py "${bench[@]}" --warm --host-cache "${WARM_HOST_CACHE:-100%}" \
      --out "$out/bench_flash_host.json" | tee "$out/bench_flash_host.md"
    results+=("$out/bench_flash_host.json")
  fi
  [ ${#results[@]} -eq 0 ] || summarize "${results[@]}"
}

# run_accelerator PLATFORM JAX_SPEC SHAPE HINT OUT_DIR [MODEL]: the whole GPU or TPU run. JAX for the
# platform (JAX_SPEC when none sees it), the device check (HINT when it fails), the generations
# (BUDGET, MAX_TOKENS), then the synthetic-model benchmarks of shape SHAPE in WORKDIR.
run_accelerator() {
  local platform=$1 jax_spec=$2 shape=$3 hint=$4
  shift 4
  [ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [MODEL]" >&2; exit 2; }
  local out model workdir
  out=$(out_dir "$1")
  model=${2:-smollm2}
  workdir=$(out_dir "${WORKDIR:-$out/synthetic-$shape}")
  cd "$ROOT"
  ensure_jax "$platform" "$jax_spec"
  require_device "$platform" "$hint"
  if step generate; then
    generations "$out" "$model" "${BUDGET:-50%}" "${MAX_TOKENS:-64}"
  fi
  synthetic_benchmarks "$out" "$shape" "$workdir"
  log "results in $out"
}
