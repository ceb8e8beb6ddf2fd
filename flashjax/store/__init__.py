"""The flash format: FFN weights on disk as bundled neuron records, everything else resident.

A flash model directory (written by `convert`):

    manifest.json          written last; format version, ModelConfig, dtype, layout, checksums, source
    resident/              Orbax checkpoint of the resident parameters (see store.resident)
    ffn/layer_000/         TensorStore zarr3 array of the layer's records, [n_blocks, ffn_block, record_width]
                           (record i at [i // ffn_block, i % ffn_block]): zarr.json + ONE shard file c/0/0/0
    ...                    (bundle=False: ffn/layer_000_gate, _up, _down[, _b_up], one array per part)
    tokenizer.json, tokenizer_config.json, generation_config.json

Row i of a layer's records is neuron i's bundle (row-column bundling): SwiGLU [w_gate[i], w_up[i],
w_down[:, i]] (+ b_gate[i], b_up[i] with FFN biases); ReLU/OPT [w_up[i], w_down[:, i]] (+ b_up[i]). Inner chunks hold
`ffn_block` records and are uncompressed, so a run of neighbouring neurons is one contiguous range.

Modules: manifest (format and checksums), zarr_io (the TensorStore arrays), resident (Orbax),
convert (the converter and FlashWriter), ffn_store (reads for the engine), host_tier (a neuron cache in host
RAM in front of ffn_store), model (opening a converted directory; `open_model_source`: whatever `--model`
names, checkpoints through flashjax.weights). This package builds on flashjax.weights; weights never imports it.
"""

from flashjax.store.convert import BLOCK_BYTES, ConvertError, FlashWriter, auto_ffn_block, convert
from flashjax.store.ffn_store import FFNStore, PendingRead, ReadStats, evict_page_cache
from flashjax.store.host_tier import HostTierStore, wrap_host_tier
from flashjax.store.manifest import (FORMAT_VERSION, Layout, Manifest, StoreChecksumError, is_flash_dir,
                                     model_config_from_dict, pack_records, read_manifest, unpack_records)
from flashjax.store.model import FlashModel, FlashModelSource, open_flash_model, open_flash_source, open_model_source
from flashjax.store.resident import load_resident

__all__ = ["BLOCK_BYTES", "auto_ffn_block", "ConvertError", "FFNStore", "FORMAT_VERSION", "FlashModel", "FlashWriter", "FlashModelSource",
           "HostTierStore",
           "Layout", "Manifest", "PendingRead", "ReadStats", "StoreChecksumError", "convert", "evict_page_cache",
           "is_flash_dir", "load_resident", "model_config_from_dict", "open_flash_model", "open_flash_source",
           "open_model_source",
           "pack_records", "read_manifest", "unpack_records", "wrap_host_tier"]
