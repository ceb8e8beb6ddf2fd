"""The dequantizing matmul equals convert-then-multiply, for every dtype, orientation and block split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.model import matmul


def _reference(x, w, rows_are_outputs):
    w32 = np.asarray(w.astype(jnp.float32), np.float64)
    x64 = np.asarray(x, np.float64)
    return x64 @ w32.T if rows_are_outputs else x64 @ w32


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows_are_outputs", [True, False])
# Row counts that the block size divides, does not divide, and that are smaller than one block.
@pytest.mark.parametrize("rows", [256, 300, 37])
@pytest.mark.parametrize("tokens", [1, 5])
def test_weight_matmul_equals_convert_then_multiply(dtype, rows_are_outputs, rows, tokens, monkeypatch):
    # Small blocks (16 rows of 64 float32 values), so a few hundred rows make several blocks.
    monkeypatch.setattr(matmul, "BLOCK_BYTES", 16 * 64 * 4)
    jax.clear_caches()
    rng = np.random.default_rng(rows + tokens)
    w = jnp.asarray(rng.standard_normal((rows, 64), np.float32)).astype(dtype)
    contract = 64 if rows_are_outputs else rows
    x = jnp.asarray(rng.standard_normal((2, tokens, contract), np.float32))
    out = jax.jit(matmul.weight_matmul, static_argnums=2)(x, w, rows_are_outputs)
    assert out.dtype == jnp.float32
    assert out.shape == (2, tokens, rows if rows_are_outputs else 64)
    np.testing.assert_allclose(np.asarray(out), _reference(x, w, rows_are_outputs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows_are_outputs", [True, False])
def test_every_block_form_is_exact(rows_are_outputs, monkeypatch):
    """The forms weight_matmul chooses between agree (the choice is only about speed)."""
    monkeypatch.setattr(matmul, "BLOCK_BYTES", 8 * 48 * 4)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((100, 48), np.float32)).astype(jnp.float16)
    x = jnp.asarray(rng.standard_normal((1, 3, 48 if rows_are_outputs else 100), np.float32))
    want = _reference(x, w, rows_are_outputs)
    for form in (matmul._blockwise, matmul._product_and_sum):
        np.testing.assert_allclose(np.asarray(form(x, w, rows_are_outputs)), want, rtol=1e-5, atol=1e-4)
    assert matmul.block_rows(48) == 8


def test_block_rows_keep_a_converted_block_near_the_target_size():
    assert matmul.block_rows(576) * 576 * 4 <= matmul.BLOCK_BYTES
    assert matmul.block_rows(576) >= 8 and matmul.block_rows(576) % 8 == 0
    assert matmul.block_rows(10 ** 6) == 8  # never fewer than 8 rows
