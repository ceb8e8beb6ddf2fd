"""`devices=N` on a model that was not converted (a Hugging Face directory, a GGUF file): the dense
engine's weights split over a mesh (flashjax/tensor_parallel.py), tokens as on one device.

conftest.py gives the process four CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4).
"""

import jax
import numpy as np
import pytest

from conftest import build_tiny, drain_tokens, random_ids
from test_gguf_parity import CASES, write_gguf

import flashjax
from flashjax.sampling import SamplingParams

# Logits are sums split across devices and added in another order: equal up to float rounding.
LOGITS_TOL = 1e-5


def _hf(name, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense-devices-" + name)
    build_tiny(name, directory)
    return str(directory)


def _gguf(name, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense-devices-gguf-" + name)
    path = directory / f"{name}.gguf"
    write_gguf(build_tiny(CASES[name].build, directory / "hf"), path, CASES[name])
    return str(path)


# llama_mha: 4 kv heads, so attention is split on 4 devices too; llama_gqa, qwen2, gemma3 and phi3 (2 kv
# heads): attention replicated on 4 devices, split on 2. Gemma 3's query/key norms and sandwich norms
# are replicated; Phi-3's fused projections are split at load, before placement.
@pytest.fixture(scope="module", params=[("hf", "llama_mha"), ("hf", "llama_gqa"), ("hf", "opt"), ("hf", "gemma3"),
                                        ("gguf", "llama_mha"), ("gguf", "qwen2"), ("gguf", "phi3_longrope")],
                ids="-".join)
def model(request, tmp_path_factory):
    kind, name = request.param
    path = (_hf if kind == "hf" else _gguf)(name, tmp_path_factory)
    return name, path, flashjax.load(path, progress=False)


@pytest.mark.parametrize("devices", [2, 4])
def test_tokens_and_logits_equal_one_device(model, devices):
    name, path, one = model
    llm = flashjax.load(path, progress=False, devices=devices)
    prompt = random_ids(6, 128, seed=31)
    ours, stats = drain_tokens(llm, prompt, n=16)
    assert ours == drain_tokens(one, prompt, n=16)[0]
    assert stats["devices"] == devices
    if devices == 4:  # sampling from logits split by vocabulary (top-k and top-p sort them)
        sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3)
        ours = drain_tokens(llm, prompt, n=8, sampling=sampled)[0]
        assert ours == drain_tokens(one, prompt, n=8, sampling=sampled)[0]
    ids = random_ids(24, 128, seed=32)
    np.testing.assert_allclose(llm.logits(ids), one.logits(ids), atol=LOGITS_TOL, rtol=0)
    # Step by step through the KV cache (split by head where attention is); the capacity and prompt
    # shape of the generation above, so nothing new is compiled.
    greedy, key = SamplingParams(), jax.random.PRNGKey(0)
    steps = {}
    for r in (llm.runner, one.runner):
        r.start(64)
        out = [r.prefill(ids[:6], greedy, key)[1]]
        out += [r.decode(np.array([ids[pos]], np.int32), pos, greedy, key)[1] for pos in range(6, len(ids))]
        steps[r] = np.concatenate([np.asarray(x) for x in out])
    np.testing.assert_allclose(steps[llm.runner], steps[one.runner], atol=LOGITS_TOL, rtol=0)


def _n_shards(array) -> int:
    """Distinct pieces of `array` across its devices (1: every device holds all of it)."""
    return len({tuple((s.start, s.stop) for s in shard.index) for shard in array.addressable_shards})


def test_weights_really_are_split(model):
    name, path, one = model
    llm = flashjax.load(path, progress=False, devices=4)
    cfg, layer = llm.config, llm.params["layers"][0]
    for leaf in (layer["ffn"]["w_up"], layer["ffn"]["w_down"], llm.params["embed"]["embedding"]):
        assert len(leaf.sharding.device_set) == 4 and _n_shards(leaf) == 4
    assert layer["ffn"]["w_up"].addressable_shards[0].data.shape == (cfg.d_ffn // 4, cfg.d_model)
    assert layer["ffn"]["w_down"].addressable_shards[0].data.shape == (cfg.d_model, cfg.d_ffn // 4)
    heads_split = cfg.n_kv_heads % 4 == 0
    assert _n_shards(layer["attn"]["wq"]) == (4 if heads_split else 1)
    assert _n_shards(layer["attn"]["wo"]) == (4 if heads_split else 1)
    assert _n_shards(layer["attn_norm"]["scale"]) == 1
    drain_tokens(llm, random_ids(4, 128), n=2)
    assert _n_shards(llm.runner.cache[0][0]) == (4 if heads_split else 1)
    assert llm.weight_bytes == one.weight_bytes  # the same model, spread


def test_no_recompile_per_token(model):
    name, path, _ = model
    llm = flashjax.load(path, progress=False, devices=4)
    prompt = random_ids(5, 128)
    list(llm.generate_ids(prompt, max_tokens=4, stop_at_eos=False))
    warm = llm.runner.compile_count()
    list(llm.generate_ids(random_ids(7, 128, 9), max_tokens=40, stop_at_eos=False))
    assert llm.runner.compile_count() == warm
    list(llm.generate_ids(prompt, max_tokens=10, sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1),
                          stop_at_eos=False))
    after_sampling = llm.runner.compile_count()
    list(llm.generate_ids(prompt, max_tokens=30, sampling=SamplingParams(temperature=1.3, seed=4), stop_at_eos=False))
    assert llm.runner.compile_count() == after_sampling


def test_device_counts_are_checked(tmp_path):
    build_tiny("llama_gqa", tmp_path)
    with pytest.raises(ValueError, match=f"sees {jax.device_count()} cpu device"):
        flashjax.load(str(tmp_path), progress=False, devices=jax.device_count() + 1)
    with pytest.raises(ValueError, match="at least 1"):
        flashjax.load(str(tmp_path), progress=False, devices=0)


def test_command_line_devices_reach_the_dense_engine(tmp_path):
    from flashjax import cli

    build_tiny("llama_mha", tmp_path)
    args = cli.build_parser().parse_args(["generate", "--model", str(tmp_path), "--prompt", "x", "--devices", "4"])
    llm = cli._load(args)
    assert llm.runner.stats()["sparsity"] == "dense" and llm.runner.parallel.n_devices == 4
    assert _n_shards(llm.params["layers"][0]["attn"]["wk"]) == 4
