"""A synthetic ReLU model with OPT's shapes, written straight into the flash format.

Random weights, scaled so that each FFN pre-activation is about N(bias_i, 1)
for a layer-normed input; per-neuron biases are drawn so that about
`active_fraction` of neurons fire per token (the paper reports ~3% for OPT
6.7B), with a spread that makes some neurons fire far more often than others,
as real models do. Nothing but the converter's own code path writes the files:
a ModelSource that makes each tensor on demand is handed to `convert`.

    python benchmarks/synthetic.py OUT [--shape opt-1.3b|opt-6.7b|tiny] [--active 0.03]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from flashjax.config import ModelConfig
from flashjax.weights.mapping import expected_shape, tensor_plan
from flashjax.weights.source import ModelSource

SHAPES = {
    # name: (d_model, d_ffn, n_layers, n_heads)
    "opt-6.7b": (4096, 16384, 32, 32),
    "opt-1.3b": (2048, 8192, 24, 32),
    "tiny": (256, 1024, 4, 4),
}


def synthetic_config(shape: str, vocab: int = 4096) -> ModelConfig:
    d, f, n_layers, n_heads = SHAPES[shape]
    return ModelConfig(architecture="opt", vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_heads, head_dim=d // n_heads, d_ffn=f, max_position=2048, norm="layer",
                       norm_eps=1e-5, ffn_activation="relu", qkv_bias=True, o_bias=True, ffn_bias=True,
                       tie_embeddings=True, rope_theta=None, position_offset=2, bos_token_id=2, eos_token_ids=(2,))


class SyntheticSource(ModelSource):
    """Makes each tensor of the synthetic model when asked, one at a time, from a fixed seed."""

    def __init__(self, cfg: ModelConfig, active_fraction: float, seed: int = 0):
        def no_tokenizer():
            from flashjax.tokenizer import TokenizerError
            raise TokenizerError("the synthetic model has no tokenizer: use token ids")
        super().__init__(f"synthetic:{cfg.d_model}x{cfg.d_ffn}x{cfg.n_layers}", "synthetic", cfg, {}, no_tokenizer)
        self.active_fraction, self.seed = active_fraction, seed

    def _tensor(self, index: int, path: str) -> np.ndarray:
        from statistics import NormalDist

        cfg = self.config
        rng = np.random.default_rng((self.seed, index))
        shape = expected_shape(cfg, path)
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "scale":
            return np.ones(shape, np.float32)
        if leaf == "b_up":
            # Threshold per neuron: mean firing rate = active_fraction, log-normal-ish spread of rates.
            rates = np.clip(rng.lognormal(np.log(self.active_fraction) - 0.5, 1.0, shape), 1e-5, 0.5)
            inv_cdf = np.vectorize(NormalDist().inv_cdf)
            return inv_cdf(rates).astype(np.float32)  # P(N(b, 1) > 0) = rate
        if leaf in ("bias", "bq", "bk", "bv", "bo", "b_down"):
            return np.zeros(shape, np.float32)
        fan_in = shape[1] if len(shape) == 2 else 1
        scale = 1.0 / np.sqrt(fan_in)
        if leaf in ("embedding", "positions"):
            scale = 1.0
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def iter_tensors(self):
        for index, (path, _, _) in enumerate(tensor_plan(self.config, "hf")):
            yield path, self._tensor(index, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shape", default="opt-1.3b", choices=sorted(SHAPES))
    p.add_argument("--active", type=float, default=0.03, help="mean share of FFN neurons active per token")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--no-bundle", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from flashjax.store import convert

    cfg = synthetic_config(args.shape)
    convert(SyntheticSource(cfg, args.active), args.out, dtype=args.dtype, overwrite=args.overwrite,
            bundle=not args.no_bundle)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
