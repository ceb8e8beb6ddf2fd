"""How to multiply by weights held narrower than the compute dtype: every form, timed on this device.

For each weight shape, storage dtype and orientation (w [N, K] with rows as outputs, x @ w.T; or
w [K, N] with rows contracted, x @ w) it times, for one token (x [1, 1, K]) and a prefill chunk
(x [1, 64, K]): the float32 product (the floor), converting the whole matrix then multiplying, the
elementwise product and sum, and row blocks converted one at a time at several block sizes; and
`weight_matmul`, the form flashjax uses. Quantized weights (q8, q4: flashjax.quant) are timed
dequantized whole then multiplied, in row blocks dequantized with the 4-bit nibbles interleaved
back into order, and through `weight_matmul` (row blocks; 4-bit blocks as two nibble halves with
x split to match). Median of --repeats calls, ms.

    python benchmarks/bench_matmul.py [--shapes 1536x576 8192x2048] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.bench.common import finish, log, machine
from flashjax.model import matmul
from flashjax.quant import QuantizedMatrix, quantize

SHAPES = ("1536x576", "4864x896", "8192x2048", "151936x896")
DTYPES = ("float16", "bfloat16", "q8", "q4")
BLOCK_KIB = (64, 256, 1024, 4096)


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _forms(rows_are_outputs: bool) -> dict:
    plain = lambda x, w: matmul._plain(x, w.astype(x.dtype), rows_are_outputs)
    forms = {"convert_then_dot": plain,
             "product_and_sum": lambda x, w: matmul._product_and_sum(x, w, rows_are_outputs),
             "weight_matmul": lambda x, w: matmul.weight_matmul(x, w, rows_are_outputs)}
    for kib in BLOCK_KIB:
        def blocked(x, w, kib=kib):
            saved = matmul.BLOCK_BYTES
            matmul.BLOCK_BYTES = kib * 1024  # read at trace time only
            try:
                return matmul._blockwise(x, w, rows_are_outputs)
            finally:
                matmul.BLOCK_BYTES = saved
        forms[f"blocks_{kib}KiB"] = blocked
    return forms


def _quantized_forms(rows_are_outputs: bool) -> dict:
    def interleaved_blocks(x, w):
        block = matmul.block_rows(w.shape[1])
        n_full = w.shape[0] // block
        # [n_full, ..., block] (rows as outputs) or [n_full, ..., K] (rows contracted), the tail left out:
        # this form exists to time the interleaving, not to be complete.
        if rows_are_outputs:
            return jax.lax.map(lambda i: matmul._plain(x, w.row_block(i * block, block).dequantize(x.dtype), True),
                               jnp.arange(n_full))
        return jnp.sum(jax.lax.map(lambda i: matmul._plain(
            jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=-1),
            w.row_block(i * block, block).dequantize(x.dtype), False), jnp.arange(n_full)), axis=0)

    return {"convert_then_dot": lambda x, w: matmul._plain(x, w.dequantize(x.dtype), rows_are_outputs),
            "interleaved_blocks": interleaved_blocks,
            "weight_matmul": lambda x, w: matmul.weight_matmul(x, w, rows_are_outputs)}


def _held(w32: np.ndarray, dtype: str):
    if dtype in ("q8", "q4"):
        return QuantizedMatrix.from_rows(quantize(w32, dtype))
    return jnp.asarray(w32).astype(dtype)


def run(shapes, repeats: int, tokens: tuple[int, ...]) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        n, k = (int(v) for v in shape.split("x"))
        w32 = rng.standard_normal((n, k), np.float32)
        for rows_are_outputs in (True, False):
            # Rows as outputs: w [N, K], x [.., K]. Rows contracted: w [N, K] read as [K', N'] = [n, k].
            contract = k if rows_are_outputs else n
            for t in tokens:
                x = jnp.asarray(rng.standard_normal((1, t, contract), np.float32))
                floor = _median_ms(jax.jit(lambda x, w: matmul._plain(x, w, rows_are_outputs)),
                                   (x, jnp.asarray(w32)), repeats)
                for dtype in DTYPES:
                    w = _held(w32, dtype)
                    row = {"shape": shape, "orientation": "x @ w.T" if rows_are_outputs else "x @ w",
                           "tokens": t, "dtype": dtype, "float32_ms": floor}
                    forms = _quantized_forms(rows_are_outputs) if dtype in ("q8", "q4") else _forms(rows_are_outputs)
                    for name, fn in forms.items():
                        row[f"{name}_ms"] = _median_ms(jax.jit(fn), (x, w), repeats)
                    log(" ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                                 for key, value in row.items()))
                    rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_ms")))
    head = "| shape | orientation | tokens | dtype | " + " | ".join(k[:-3] for k in keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['orientation']} | {r['tokens']} | {r['dtype']} | "
                     + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="NxK weight shapes")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64], help="rows of x (one token, a prefill chunk)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--json", action="store_true", help="print the JSON as the last line of stdout")
    args = p.parse_args(argv)
    rows = run(args.shapes, args.repeats, tuple(args.tokens))
    print(markdown(rows))
    return finish({"machine": machine(), "backend": jax.default_backend(), "block_bytes": matmul.BLOCK_BYTES,
                   "rows": rows}, args)


if __name__ == "__main__":
    sys.exit(main())
