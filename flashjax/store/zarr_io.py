"""TensorStore zarr3 arrays holding FFN records: one shard file per array, one inner chunk per block.

A layer's records [d_ffn, width] are stored as a zarr3 array of shape [n_blocks, ffn_block, width]
(record i is element [i // ffn_block, i % ffn_block]; the last block is zero-padded when ffn_block
does not divide d_ffn) with the `sharding_indexed` codec: the whole array is ONE shard (the file `c/0/0/0`
next to `zarr.json`) whose inner chunks are [1, ffn_block, width], i.e. one block each. There is no
compression and every chunk is stored even when it is all zeros (`store_data_equal_to_fill_value`), so
block k is the byte range [k * block_bytes, (k + 1) * block_bytes) of the shard file, in order; the
shard index (16 bytes per block plus a crc32c) sits at its end. The bytes are those of a 2-D
[d_ffn, width] array with inner chunks [ffn_block, width]: the leading block axis only lets one
TensorStore read with an index array fetch any set of whole blocks. Measured on this machine, a read
issued from Python costs about 30-40 us and an index-array element inside TensorStore about 5 us, so
"one read of the wanted blocks" beats both one read per run of blocks and one index per neuron.
"""

from __future__ import annotations

import numpy as np
import tensorstore as ts

BYTES_CODEC = {"name": "bytes", "configuration": {"endian": "little"}}


def n_blocks(rows: int, ffn_block: int) -> int:
    return -(-rows // ffn_block)


def array_spec(path: str, rows: int, width: int, dtype: str, ffn_block: int) -> dict:
    """The TensorStore spec that creates a sharded record array at `path` for `rows` records."""
    nb = n_blocks(rows, ffn_block)
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": path},
        "metadata": {
            "shape": [nb, ffn_block, width],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [nb, ffn_block, width]}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [1, ffn_block, width],
                "codecs": [BYTES_CODEC],
                "index_codecs": [BYTES_CODEC, {"name": "crc32c"}],
                "index_location": "end",
            }}],
            "fill_value": 0,
        },
        # Store all-zero blocks too, so block k is always at offset k * block_bytes.
        "store_data_equal_to_fill_value": True,
        "create": True,
    }


def make_context(concurrency: int = 32) -> ts.Context:
    """A TensorStore context for reading: `concurrency` file reads in flight, and no chunk cache (the
    engine keeps its own neuron cache, so TensorStore's would only double the memory and hide I/O)."""
    return ts.Context({"cache_pool": {"total_bytes_limit": 0},
                       "file_io_concurrency": {"limit": int(concurrency)}})


def write_array(path: str, records: np.ndarray, dtype: str, ffn_block: int) -> None:
    """Creates the array at `path` and writes `records` [rows, width] (already in `dtype`) into it.

    The shard is written in one go: TensorStore rewrites a whole shard on every write, so splitting
    the write would only rewrite it many times.
    """
    rows, width = records.shape
    nb = n_blocks(rows, ffn_block)
    if nb * ffn_block != rows:
        records = np.concatenate([records, np.zeros((nb * ffn_block - rows, width), records.dtype)])
    store = ts.open(array_spec(path, rows, width, dtype, ffn_block), context=make_context()).result()
    store.write(records.reshape(nb, ffn_block, width)).result()


def open_array(path: str, context: ts.Context) -> ts.TensorStore:
    """Opens an existing record array for reading."""
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}, "open": True},
                   context=context, read=True).result()
