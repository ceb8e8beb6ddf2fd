"""Several devices (--devices N): each layer's neurons split across a JAX mesh, tokens as on one device.

conftest.py gives the process four CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4).
"""

import jax
import numpy as np
import pytest

from conftest import build_tiny, calibrated_copy, drain_tokens, random_ids

import flashjax
from flashjax.flash.shards import NeuronPartition
from flashjax.store import convert


@pytest.fixture(scope="module", params=["llama_gqa", "opt", "gemma3"])
def tiny_flash(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-" + request.param)
    build_tiny(request.param, root / "hf")
    # Blocks of 4 neurons: 24 blocks per layer, so four devices get six each.
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", ffn_block=4, progress=False)
    return request.param, str(root / "flash")


def test_four_cpu_devices_are_there():
    assert len(jax.devices()) >= 4


def test_partition_owns_whole_blocks_evenly():
    part = NeuronPartition.make(d_ffn=100, block=8, n_shards=3)  # 13 blocks: 5, 4, 4
    assert part.offsets == (0, 40, 72, 100)
    ids = np.array([0, 7, 39, 40, 71, 72, 99])
    local = part.split(ids)
    assert [x.tolist() for x in local] == [[0, 7, 39], [0, 31], [0, 27]]
    assert part.join(local).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="only 2 blocks"):
        NeuronPartition.make(d_ffn=16, block=8, n_shards=3)


@pytest.mark.parametrize("sparsity,budget", [("naive", None), ("hybrid", "5MB"), ("oracle", None)])
@pytest.mark.parametrize("devices", [2, 4])
def test_tokens_equal_one_device(tiny_flash, sparsity, budget, devices):
    name, path = tiny_flash
    prompt = random_ids(6, 128, seed=21)
    one, _ = drain_tokens(flashjax.load(path, sparsity=sparsity, memory_budget=budget, window=2, scratch_rows=16),
                          prompt)
    llm = flashjax.load(path, sparsity=sparsity, memory_budget=budget, window=2, scratch_rows=16, devices=devices)
    ours, stats = drain_tokens(llm, prompt)
    assert ours == one
    assert stats["devices"] == devices
    assert stats["weights_bytes"] <= stats["memory_budget_bytes"]
    # Every layer's cache buffers really are split across the devices, one shard each.
    buffer = llm.runner.ffn.buffers[0]["up"]
    assert len(buffer.sharding.device_set) == devices
    assert {s.data.shape[0] for s in buffer.addressable_shards} == {llm.runner.plan.cache_rows_per_layer}


def test_tight_budget_streams_through_every_device(tiny_flash):
    """A budget with room for a few rows per device: caches, evictions and scratch on all devices."""
    name, path = tiny_flash
    prompt = random_ids(5, 128, seed=22)
    dense, _ = drain_tokens(flashjax.load(path), prompt)
    probe = flashjax.load(path, sparsity="oracle", memory_budget="1GB", devices=4, scratch_rows=16)
    plan = probe.runner.plan
    budget = plan.resident_bytes + plan.scratch_bytes + plan.io_buffer_bytes + 3 * plan.row_bytes * plan.n_layers
    llm = flashjax.load(path, sparsity="oracle", memory_budget=budget, devices=4, window=2, scratch_rows=16)
    assert llm.runner.plan.cache_rows_per_layer == 3
    ours, stats = drain_tokens(llm, prompt)
    assert ours == dense
    assert stats["weights_bytes"] <= budget


def test_predictors_on_several_devices(tiny_flash, tmp_path_factory):
    name, path = tiny_flash
    calibrated = calibrated_copy(path, tmp_path_factory)
    prompt = random_ids(6, 128, seed=23)
    dense, _ = drain_tokens(flashjax.load(calibrated), prompt)
    # Every neuron selected: equal to dense, with lookahead reads issued across devices.
    llm = flashjax.load(calibrated, sparsity="predictor", predictor_threshold=-1.0, window=2, devices=2)
    ours, stats = drain_tokens(llm, prompt)
    assert ours == dense
    assert stats["lookahead_coverage"] is not None
    one, _ = drain_tokens(flashjax.load(calibrated, sparsity="predictor", predictor_threshold=0.6), prompt)
    many, _ = drain_tokens(flashjax.load(calibrated, sparsity="predictor", predictor_threshold=0.6, devices=4),
                           prompt)
    assert many == one


def test_pinned_staging_and_host_tier(tiny_flash):
    """Rows staged through pinned host memory, and a host-RAM tier that holds the whole FFN: after the
    prompt's pass nothing more is read from disk."""
    name, path = tiny_flash
    prompt = random_ids(6, 128, seed=24)
    dense, _ = drain_tokens(flashjax.load(path), prompt)
    llm = flashjax.load(path, sparsity="naive", memory_budget="1GB", devices=2, staging="pinned",
                        host_cache="100%")
    assert llm.runner.placer.staging == "pinned"
    ours, stats = drain_tokens(llm, prompt)
    assert ours == dense
    assert stats["bytes_read_per_token"] == 0
    assert stats["host_hits_per_token"] == llm.config.n_layers * llm.config.d_ffn
    assert stats["host_cache_bytes"] >= stats["ffn_bytes"]


def test_no_budget_spreads_the_whole_model(tiny_flash):
    """devices=N with no budget: every neuron cached across the devices; reads stop after the first step."""
    name, path = tiny_flash
    prompt = random_ids(6, 128, seed=25)
    dense, _ = drain_tokens(flashjax.load(path), prompt, n=6)
    llm = flashjax.load(path, devices=4)
    assert llm.runner.options.sparsity == "hybrid"
    ours, stats = drain_tokens(llm, prompt, n=6)
    assert ours == dense
    # 5 decode steps: the first reads every neuron into the caches, the other 4 hit all of them.
    assert stats["cache_hit_rate"] == pytest.approx(4 / 5)


def test_bad_device_counts(tiny_flash):
    # An unconverted model runs on several devices too: the dense engine (test_dense_devices.py).
    name, path = tiny_flash
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        flashjax.load(path, sparsity="naive", devices=len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="at least 1"):
        flashjax.load(path, sparsity="naive", devices=0)


def test_command_line_options_reach_the_engine(tiny_flash):
    from flashjax import cli

    name, path = tiny_flash
    args = cli.build_parser().parse_args(["generate", "--model", path, "--prompt", "x", "--sparsity", "naive",
                                          "--memory-budget", "1GB", "--devices", "2", "--host-cache", "100%",
                                          "--staging", "direct"])
    runner = cli._load(args).runner
    assert (runner.options.devices, runner.options.host_cache, runner.placer.staging) == (2, "100%", "direct")
    assert runner.store.nbytes >= runner.stats()["ffn_bytes"]  # the host tier holds the whole FFN
