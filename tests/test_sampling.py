"""Sampling: greedy, temperature, top-k, top-p, seeded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashjax.sampling import SamplingParams, sample

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def _draws(n=400, **kw):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    f = jax.jit(jax.vmap(lambda k: sample(LOGITS, k, kw.get("t", 1.0), kw.get("k", 0), kw.get("p", 1.0), False)[0]))
    return np.asarray(f(keys))


def test_greedy_is_argmax():
    assert int(sample(LOGITS, jax.random.PRNGKey(0), 1.0, 0, 1.0, True)[0]) == 0


def test_top_k_keeps_only_k_tokens():
    assert set(_draws(k=2)) <= {0, 1}
    assert set(_draws(k=1)) == {0}


def test_top_p_keeps_smallest_prefix():
    # 0.5 + 0.3 reaches 0.8: tokens 0 and 1 only.
    assert set(_draws(p=0.8)) <= {0, 1}
    assert set(_draws(p=0.01)) == {0}


def test_temperature_one_follows_the_distribution():
    freq = np.bincount(_draws(n=4000), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
