"""`--devices N` for the dense engine: the model's weights split over a one-axis device mesh.

A transform applied at load time, as gpt-fast's tp.py is: each weight is placed on the mesh with a
`NamedSharding` as it is read, the KV cache likewise, and jit (GSPMD) inserts the collectives. The
dense runner still makes one jitted call per token and does not know how many devices there are.
Tokens equal the one-device run; logits differ by float rounding only (a sum split across devices
is added in another order).

Split along the mesh's one axis:

- FFN neurons: rows of w_gate and w_up (and their biases), columns of w_down, as the flash engine
  splits neurons. Each device computes its neurons' activations and a partial down projection;
  one all-reduce per layer.
- attention heads, when the kv heads divide by N: rows of wq, wk, wv (and their biases), columns of
  wo, and the KV cache by kv head. A device holds whole kv-head groups with their query heads, so
  attention needs no communication until wo's partial sums are all-reduced. When they do not
  divide (SmolLM2's 3 kv heads on 2 or 4 devices), attention and its cache are replicated.
- the vocabulary: rows of the embedding table and of an untied head. It is the largest matrix of a
  small model (Qwen2.5-0.5B: 136M of its 494M weights) and the head the largest product of a
  decode step, so replicating it would cost every device that memory and that time. Split, each
  device computes its share of the logits, gathered ([V] floats) for sampling; a token's embedding
  row is gathered from the device that holds it.

Everything else (norms, OPT's learned positions, the biases added after w_down and wo) is small and
replicated. A group whose size does not divide by N is replicated rather than padded: padding would
change the shapes the model code declares.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flashjax.config import ModelConfig
from flashjax.model.params import load_params

# A parameter's leaf name -> (the axis that is split, the group it belongs to). A group is split only
# when its size (below) divides by the number of devices.
SPLITS = {
    "w_gate": (0, "ffn"), "w_up": (0, "ffn"), "b_gate": (0, "ffn"), "b_up": (0, "ffn"), "w_down": (1, "ffn"),
    "wq": (0, "heads"), "wk": (0, "heads"), "wv": (0, "heads"),
    "bq": (0, "heads"), "bk": (0, "heads"), "bv": (0, "heads"), "wo": (1, "heads"),
    "embedding": (0, "vocab"), "lm_head": (0, "vocab"),
}
GROUPS = ("ffn", "heads", "vocab")


def group_sizes(cfg: ModelConfig) -> dict[str, int]:
    # Heads are split by kv head: a kv head's query heads go with it.
    return {"ffn": cfg.d_ffn, "heads": cfg.n_kv_heads, "vocab": cfg.vocab_size}


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """Where each weight of the dense model lives on a one-axis mesh of N devices."""

    mesh: Mesh
    split: frozenset  # the groups of GROUPS that are split; the others are replicated

    @classmethod
    def make(cls, cfg: ModelConfig, n_devices: int) -> "TensorParallel":
        from flashjax.flash.shards import make_mesh  # one mesh, one error for too many devices

        if n_devices < 1:
            raise ValueError(f"devices must be at least 1, got {n_devices}")
        mesh = make_mesh(n_devices)
        return cls(mesh, frozenset(g for g, size in group_sizes(cfg).items() if size % n_devices == 0))

    @property
    def axis(self) -> str:
        return self.mesh.axis_names[0]

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def kv_sharding(self) -> NamedSharding:
        # [B, K, S, H]: split by kv head where attention is, so each device's cache is its heads' own.
        return NamedSharding(self.mesh, PartitionSpec(None, self.axis) if "heads" in self.split else PartitionSpec())

    def spec(self, path: str, ndim: int) -> PartitionSpec:
        """The placement of the parameter at a dotted path like "layers.3.ffn.w_up"."""
        rule = SPLITS.get(path.rsplit(".", 1)[-1])
        if rule is None or rule[1] not in self.split:
            return PartitionSpec()
        axes = [None] * ndim
        axes[rule[0]] = self.axis
        return PartitionSpec(*axes)

    def load_params(self, source, dtype, progress: bool = True) -> dict:
        """`model.params.load_params`, each tensor going from the host straight to its devices: no
        device ever holds a whole split weight, or the whole model."""
        def place(path, array):
            return jax.device_put(array, NamedSharding(self.mesh, self.spec(path, array.ndim)))

        return load_params(source, dtype, progress=progress, place=place)

    def describe(self) -> str:
        split = [g for g in GROUPS if g in self.split]
        whole = [g for g in GROUPS if g not in self.split]
        names = {"ffn": "FFN neurons", "heads": "attention heads", "vocab": "vocabulary"}
        text = f"{self.n_devices} devices: " + (", ".join(names[g] for g in split) or "nothing") + " split"
        return text + (f"; {', '.join(names[g] for g in whole)} replicated (not divisible)" if whole else "")
