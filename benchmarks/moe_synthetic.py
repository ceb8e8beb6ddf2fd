"""A synthetic OLMoE-shaped mixture of experts, written twice from the same weights: a flash model
(q4 records, flashjax.store.FlashWriter) and a GGUF that llama.cpp loads (architecture "olmoe").

    python benchmarks/moe_synthetic.py --out DIR [--scale olmoe|tiny] [--seed N] [--json] [--overwrite]

writes DIR/flash (the flash model), DIR/model.gguf and DIR/info.json (shapes, sizes, the skew model
and the expert usage it produced, measured). Progress goes to stderr; with --json one JSON object
(the same as info.json, plus the run's time and peak RSS) is the last line of stdout.

Default shapes are OLMoE-1B-7B's: 16 layers, d_model 2048, 64 experts of 1024 neurons, top-8, 16 heads
of 128, vocabulary 50304 (6.9B weights, 1.3B active per token); `--scale tiny` is a two-layer toy for
tests. Each shape can be overridden (--layers, --d-model, --experts, --expert-ffn, --top-k, --heads,
--head-dim, --vocab).

**The same weights, exactly.** Every quantized weight is generated on a grid that both formats hold
without rounding: a tensor's values are s * k with one float16 step s per tensor and integer codes k
(4-bit: -8..7; 8-bit: -127..127), and every block of 32 that either format quantizes holds the codes
that pin its scale: a -8 and a 7 (4-bit), a -127 or 127 (8-bit). That is how real quantized blocks
look (a Q4_0 block always has its largest value at code 0 / -8 d; a Q4_1 block has codes 0 and 15), and
it makes each format's own quantizer return the codes unchanged: llama.cpp's Q4_0 takes d = -8 s / -8
= s, flashjax's q4 (ggml's Q4_1 layout: scale and offset) takes offset -8 s and scale 15 s / 15 = s,
and Q8_0 / q8 take 127 s / 127 = s. The down projection is quantized along different axes by the two
formats (the GGUF's blocks run along a row of w_down, across neurons; a flash record holds one neuron's
column), so its pinned codes are placed as two disjoint random permutations in every 32 x 32 tile,
which pins every block both ways. Elsewhere the pinned positions are random per block. The rest of a
tensor's codes are round(normal * 2.5) (4-bit) or round(normal * 32) (8-bit), clipped. The writer
checks this on every layer (its first expert and attention matrix through gguf.quants.quantize and
flashjax.quant.quantize); tests/test_moe_synthetic.py compares every tensor of the two files.

**Formats.** GGUF: experts and attention Q4_0 (4.5 bits per weight), token_embd and output Q8_0 (as
llama.cpp's Q4_0 mixes keep the output matrix at higher precision), router (ffn_gate_inp) and norms
F32, as llama.cpp's converter stores them. Flash: dtype "q4" (5 bits per weight: float16 scale and
offset per block of 32), the embedding and head at q8, norms float32, the router at q4 (flashjax's
resident format for a q4 model; the GGUF's F32 router holds the same grid values). So the flash copy
is about 10% larger than the GGUF for the same values (5 vs 4.5 bits per expert weight).

**Routing skew.** Real MoE routers are load-balanced over a large batch, but within one text some
experts are hot, and consecutive tokens share experts more often than chance. Both are built in:

- Popularity. Every token embedding carries a shared direction (embedding = normal + u * sqrt(d_model),
  the residual stream's common component: real models have one, the "massive activations"). Layer i's
  router is random rows orthogonal to m_i, the mean of the layer's normalized FFN inputs (measured on
  calibration tokens while writing), with std `router_noise` (2.0) logits on a normalized input, plus
  b_e * m_i / |m_i|^2 for each expert, so an average token's logit for expert e is raised by b_e:
  b_e = router_skew * (log p_e - mean log p) with Zipf popularity p_e ~ 1 / rank_e ^ router_zipf over
  a random ranking per layer (defaults: zipf 1.0, skew 0.7). The quantization's own random bias (the
  pinned codes) is folded back in (Generator.router), so only b_e sets the popularity.
- Locality. Half of each layer's heads attend to the last few tokens (a RoPE recency term built into
  their queries and keys, Generator.attention_weights) and add that recent average, in the input's own
  basis, to the residual stream; consecutive tokens' FFN inputs share it, and so do their choices.

The routing this produces is measured on held-out probe tokens (random ids) with a numpy forward pass of
the model as written (run layer by layer while writing, on the exact grid values; flashjax's dense
engine gives the same logits), and recorded in info.json per layer: the usage histogram, its normalized
entropy, the hottest expert's share against the mean, the share of the hottest 10%, the overlap of
consecutive tokens' expert sets against what independent choices with the same usage would give (and
uniform choices: k / E), the top-k router weight mass, the local heads' attention on the last 4
tokens. At the default shape and seed (16 layers, 256 held-out tokens): usage entropy 0.84-0.95 (mean
0.89), the hottest expert 3.8-7x the mean (the hottest 10% of experts take 34% of the choices), top-8
router weight mass ~0.67, and consecutive tokens share 25% of their experts in layer 1 rising to ~60%
in the last layers (mean 47%) against 19-35% for independent choices with the same usage (12.5%
uniform). --router-skew 0.5 flattens the popularity (on 4 layers: entropy 0.95, hottest 3.4x).
The same pass checks that the logits are finite and not constant, and records the residual RMS
(3 after layer 1, 18 after layer 16).

Default shape on this 2-core machine: 6.6 minutes, peak RSS 1.7 GB; flash 4.33 GB, GGUF 4.00 GB.

Tokenizer: a GPT-2-style byte-level BPE (tokenizer.ggml.model "gpt2", pre-tokenizer "gpt-2"): the 256
byte tokens, "<|endoftext|>" (eos, id 256), then two-byte tokens with their merges, frequent letters
first, up to the vocabulary size. llama.cpp, flashjax's Tokenizer.from_gguf and the flash copy's
tokenizer.json all accept it.

Memory: tensors are made one at a time (experts one at a time, a layer's records then written); the
largest buffers are one layer's records and its three expert tensors in GGUF blocks (~0.5 GB at the
default shape). Everything is written into a temporary sibling of DIR and renamed into place at the end,
so an interrupted run leaves nothing that loads; the free disk space is checked first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np

GROUP = 32  # block size of Q4_0 / Q8_0 and of flashjax's q4 / q8
Q4_SIGMA = 2.5  # code std of a 4-bit tensor's gaussian part (clipped to -8..7)
Q8_SIGMA = 32.0  # code std of an 8-bit tensor's gaussian part (clipped to -127..127)
QK_NORM_GAIN = 1.5  # q/k norm weights ~1.5: attention logits of std ~2 for random queries and keys
EMBED_CHUNK = 4096  # rows of the embedding and head generated at once (part of the seed scheme)
EOS_TEXT = "<|endoftext|>"

# Per-tensor stream ids: the random numbers of each (layer, tensor, expert or chunk) come from a generator
# of their own, seeded with (seed, ...), so no piece's numbers depend on how many were drawn before it.
# (The routers and the local heads also depend on the layers below them, through the calibration.)
STREAMS = {"direction": 1, "embed": 2, "head": 3, "final_norm": 4, "probe": 5, "attn_norm": 10, "wq": 11,
           "wk": 12, "wv": 13, "wo": 14, "q_norm": 15, "k_norm": 16, "ffn_norm": 17, "router": 18,
           "router_rank": 19, "local": 23, "gate": 20, "up": 21, "down": 22, "pins": 30}


@dataclasses.dataclass(frozen=True)
class Spec:
    n_layers: int
    d_model: int
    n_experts: int
    expert_ffn: int
    top_k: int
    n_heads: int
    head_dim: int
    vocab: int
    max_position: int = 4096
    probe_seqs: int = 8  # random-id sequences run through the model while it is written (half calibrate)
    probe_len: int = 64
    router_zipf: float = 1.0
    router_skew: float = 0.7
    router_noise: float = 2.0  # std of the router's random logits for a normalized input
    shared_direction: float = 1.0  # size of the embeddings' shared component, relative to their noise
    down_gain: float = 3.0  # std of w_down is down_gain / sqrt(expert_ffn)
    local_heads: float = 0.5  # share of each layer's heads that attend to recent tokens (see attention_weights)
    local_strength: float = 5.0  # range of the local heads' recency term in their attention logits
    local_copy: float = 2.0
    logit_std: float = 2.5  # std of the head's logits for a normalized input
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 0

    def check(self) -> None:
        if self.n_heads * self.head_dim != self.d_model:
            raise ValueError(f"llama.cpp's OLMoE normalizes queries and keys over d_model values: heads x head_dim "
                             f"({self.n_heads} x {self.head_dim}) must equal d_model ({self.d_model})")
        for name in ("d_model", "expert_ffn"):
            if getattr(self, name) % GROUP:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of {GROUP} (quantized blocks)")
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"top-k must be in 1..{self.n_experts}, got {self.top_k}")
        if not 258 <= self.vocab <= 257 + 256 * 256:
            raise ValueError(f"vocab must be in 258..{257 + 256 * 256} (byte tokens, eos, two-byte tokens)")
        if self.probe_seqs < 2 or self.probe_len < 2:
            raise ValueError("the probe needs at least 2 sequences (calibration, held out) of 2 tokens")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")


PRESETS = {
    # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): its shapes, rope_theta, eps and context.
    "olmoe": Spec(n_layers=16, d_model=2048, n_experts=64, expert_ffn=1024, top_k=8, n_heads=16, head_dim=128,
                  vocab=50304),
    "tiny": Spec(n_layers=2, d_model=64, n_experts=8, expert_ffn=32, top_k=2, n_heads=4, head_dim=16, vocab=320,
                 max_position=256, probe_seqs=4, probe_len=32),
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def model_config(spec: Spec):
    """The flashjax ModelConfig of the model (OLMoE: whole-projection q/k norms, no top-k renormalizing,
    which is also what llama.cpp's olmoe graph does)."""
    from flashjax.config import ModelConfig

    return ModelConfig(architecture="olmoe", vocab_size=spec.vocab, d_model=spec.d_model, n_layers=spec.n_layers,
                       n_heads=spec.n_heads, n_kv_heads=spec.n_heads, head_dim=spec.head_dim,
                       d_ffn=spec.n_experts * spec.expert_ffn, max_position=spec.max_position, norm="rms",
                       norm_eps=spec.norm_eps, ffn_activation="silu_glu", tie_embeddings=False,
                       rope_theta=spec.rope_theta, qk_norm=True, qk_norm_whole=True, n_experts=spec.n_experts,
                       experts_per_token=spec.top_k, router_renormalize=False, bos_token_id=256,
                       eos_token_ids=(256,))


# -- sizes ----------------------------------------------------------------------------------------


def _q4_0_bytes(n: int) -> int:
    return n // GROUP * 18


def _q8_0_bytes(n: int) -> int:
    return n // GROUP * 34


def gguf_tensor_plan(spec: Spec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, GGML type) of every GGUF tensor, in file order."""
    d, e, f, v, q = spec.d_model, spec.n_experts, spec.expert_ffn, spec.vocab, spec.n_heads * spec.head_dim
    plan = [("token_embd.weight", (v, d), "Q8_0")]
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (d,), "F32"), (b + "attn_q.weight", (q, d), "Q4_0"),
                 (b + "attn_k.weight", (q, d), "Q4_0"), (b + "attn_v.weight", (q, d), "Q4_0"),
                 (b + "attn_output.weight", (d, q), "Q4_0"), (b + "attn_q_norm.weight", (q,), "F32"),
                 (b + "attn_k_norm.weight", (q,), "F32"), (b + "ffn_norm.weight", (d,), "F32"),
                 (b + "ffn_gate_inp.weight", (e, d), "F32"), (b + "ffn_gate_exps.weight", (e, f, d), "Q4_0"),
                 (b + "ffn_up_exps.weight", (e, f, d), "Q4_0"), (b + "ffn_down_exps.weight", (e, d, f), "Q4_0")]
    plan += [("output_norm.weight", (d,), "F32"), ("output.weight", (v, d), "Q8_0")]
    return plan


def _tensor_bytes(shape, kind: str) -> int:
    n = int(np.prod(shape))
    return {"F32": 4 * n, "Q4_0": _q4_0_bytes(n), "Q8_0": _q8_0_bytes(n)}[kind]


def estimated_bytes(spec: Spec) -> dict[str, int]:
    """Bytes of the two copies (flash: records and resident tensors; GGUF: tensor data), without the
    few MB of metadata, tokenizer and alignment."""
    from flashjax.quant import row_bytes

    d, q = spec.d_model, spec.n_heads * spec.head_dim
    gguf_bytes = sum(_tensor_bytes(shape, kind) for _, shape, kind in gguf_tensor_plan(spec))
    records = spec.n_layers * spec.n_experts * spec.expert_ffn * 3 * row_bytes("q4", d)
    attention = spec.n_layers * (3 * q * row_bytes("q4", d) + d * row_bytes("q4", q))
    router = spec.n_layers * spec.n_experts * row_bytes("q4", d)
    tables = 2 * spec.vocab * row_bytes("q8", d)
    norms = 4 * (spec.n_layers * (2 * d + 2 * q) + d)
    return {"flash": records + attention + router + tables + norms, "gguf": gguf_bytes}


# -- the grid -------------------------------------------------------------------------------------


def grid_step(std: float, bits: int) -> float:
    """The float16 step s of a tensor whose values have standard deviation `std`."""
    s = float(np.float16(std / (Q4_SIGMA if bits == 4 else Q8_SIGMA)))
    if not 2.0 ** -14 <= s <= 2000.0:  # a normal float16 with room for 127 * s
        raise ValueError(f"grid step {s} for std {std} is outside float16's normal range")
    return s


def to_codes(w: np.ndarray, s: float, bits: int) -> np.ndarray:
    """round(w / s) clipped to the code range, int8 (w is overwritten)."""
    lo, hi = (-8, 7) if bits == 4 else (-127, 127)
    np.multiply(w, np.float32(1.0 / s), out=w)
    np.rint(w, out=w)
    np.clip(w, lo, hi, out=w)
    return w.astype(np.int8)


def pin_blocks(codes: np.ndarray, bits: int, rng: np.random.Generator) -> None:
    """Puts each block of 32 along the rows' last axis at its scale: a -8 and a 7 at random distinct
    positions (4-bit), a -127 or 127 at a random position (8-bit). In place."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, cols // GROUP, GROUP)
    first = rng.integers(0, GROUP, (rows, cols // GROUP, 1))
    if bits == 4:
        second = (first + rng.integers(1, GROUP, first.shape)) % GROUP
        np.put_along_axis(blocks, first, np.int8(-8), axis=-1)
        np.put_along_axis(blocks, second, np.int8(7), axis=-1)
    else:
        signs = np.where(rng.random(first.shape) < 0.5, -127, 127).astype(np.int8)
        np.put_along_axis(blocks, first, signs, axis=-1)


def pin_tiles(codes: np.ndarray, rng: np.random.Generator) -> None:
    """4-bit codes [R, C] (both multiples of 32): in every 32 x 32 tile a -8 on a random permutation
    and a 7 on a shifted copy of it, so every block of 32 along a row and along a column holds both.
    In place."""
    rows, cols = codes.shape
    tiles_r, tiles_c = rows // GROUP, cols // GROUP
    n = tiles_r * tiles_c
    perm = np.argsort(rng.random((n, GROUP)), axis=1)
    shift = rng.integers(1, GROUP, (n, 1))
    i = np.arange(GROUP)[None, :]
    row = (np.arange(n) // tiles_c)[:, None] * GROUP + i
    base = (np.arange(n) % tiles_c)[:, None] * GROUP
    codes[row, base + perm] = -8
    codes[row, base + np.take_along_axis(perm, (i + shift) % GROUP, axis=1)] = 7


def random_codes(rng: np.random.Generator, shape: tuple[int, int], std: float, bits: int,
                 both_axes: bool = False) -> tuple[np.ndarray, float]:
    """Gaussian weights of standard deviation ~`std` on the grid: (codes int8, step s)."""
    s = grid_step(std, bits)
    codes = to_codes(rng.standard_normal(shape, dtype=np.float32) * np.float32(std), s, bits)
    if both_axes:
        pin_tiles(codes, rng)
    else:
        pin_blocks(codes, bits, rng)
    return codes, s


def values(codes: np.ndarray, s: float) -> np.ndarray:
    """The float32 weights the codes stand for (exact: s is a float16, codes small integers)."""
    return codes.astype(np.float32) * np.float32(s)


# -- the two encodings of a grid tensor -----------------------------------------------------------


def gguf_blocks(codes: np.ndarray, s: float, bits: int) -> np.ndarray:
    """GGUF Q4_0 (bits 4) or Q8_0 (bits 8) bytes of codes [..., k], rows along the last axis."""
    from flashjax.quant import pack_codes

    lead, k = codes.shape[:-1], codes.shape[-1]
    flat = codes.reshape(-1, k)
    nb = k // GROUP
    scale = np.frombuffer(np.float16(s).tobytes(), np.uint8)
    if bits == 4:
        out = np.empty((flat.shape[0], nb, 18), np.uint8)
        out[:, :, 2:] = pack_codes((flat + 8).astype(np.uint8)).reshape(-1, nb, 16)
    else:
        out = np.empty((flat.shape[0], nb, 34), np.uint8)
        out[:, :, 2:] = flat.view(np.uint8).reshape(-1, nb, 32)
    out[:, :, :2] = scale
    return out.reshape(lead + (nb * out.shape[-1],))


def flash_rows(codes: np.ndarray, s: float, bits: int):
    """flashjax.quant.QuantizedRows of codes [rows, k]: q4 (scale s, offset -8 s) or q8 (scale s)."""
    from flashjax.quant import QuantizedRows, pack_codes

    rows, k = codes.shape
    scales = np.full((rows, k // GROUP), s, np.float16)
    if bits == 4:
        return QuantizedRows("q4", pack_codes((codes + 8).astype(np.uint8)), scales,
                             np.full((rows, k // GROUP), -8 * s, np.float16))
    return QuantizedRows("q8", np.ascontiguousarray(codes), scales)


def check_encodings(name: str, codes: np.ndarray, s: float, bits: int, gguf_bytes: np.ndarray, rows) -> None:
    """The bytes written are what gguf.quants.quantize and flashjax.quant.quantize make of the values."""
    import gguf
    from flashjax.quant import quantize

    w = values(codes, s)
    qtype = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
    if not np.array_equal(gguf.quants.quantize(w, qtype).reshape(-1), np.asarray(gguf_bytes).reshape(-1)):
        raise AssertionError(f"{name}: the GGUF blocks differ from gguf.quants.quantize of the same values")
    if rows is not None and not np.array_equal(quantize(values(rows[0], s), rows[1]).to_bytes(), rows[2]):
        raise AssertionError(f"{name}: the flash rows differ from flashjax.quant.quantize of the same values")


# -- tokenizer ------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): byte tokens 0..255, "<|endoftext|>" 256 (control), then two-byte
    tokens (each with its merge), pairs of frequent characters first."""
    b2u = bytes_to_unicode()
    frequent = (" etaoinshrdlcumwfgypbvkjxqz" + "ETAOINSHRDLCUMWFGYPBVKJXQZ" + "0123456789" + ".,'\"-!?;:()\n").encode()
    order = list(dict.fromkeys(list(frequent) + list(range(256))))
    rank = {b: r for r, b in enumerate(order)}
    n_pairs = vocab_size - 257
    pairs = []
    for m in range(256):  # pairs whose rarer byte has rank m, in rank order
        a = order[m]
        pairs += [(a, order[j]) for j in range(m)] + [(order[j], a) for j in range(m)] + [(a, a)]
        if len(pairs) >= n_pairs:
            break
    pairs = sorted(pairs, key=lambda p: (max(rank[p[0]], rank[p[1]]), rank[p[0]], rank[p[1]]))[:n_pairs]
    tokens = [b2u[b] for b in range(256)] + [EOS_TEXT] + [b2u[a] + b2u[b] for a, b in pairs]
    types = [1] * 256 + [3] + [1] * n_pairs
    merges = [f"{b2u[a]} {b2u[b]}" for a, b in pairs]
    return tokens, types, merges


def add_tokenizer(writer, spec: Spec) -> None:
    tokens, types, merges = build_vocab(spec.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def add_metadata(writer, spec: Spec, name: str) -> None:
    """The keys llama.cpp's convert_hf_to_gguf.py writes for OLMoE (OlmoeModel): no norm_topk_prob
    (llama.cpp's olmoe graph never renormalizes the top-k weights), no head_dim (it is d_model / heads)."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(spec.max_position)
    writer.add_embedding_length(spec.d_model)
    writer.add_feed_forward_length(spec.expert_ffn)
    writer.add_block_count(spec.n_layers)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_expert_count(spec.n_experts)
    writer.add_expert_used_count(spec.top_k)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, spec)


def make_tokenizer(spec: Spec, directory: str):
    """flashjax's Tokenizer for the vocabulary, read back from a vocabulary-only GGUF (so it is what
    Tokenizer.from_gguf makes of the model's GGUF)."""
    import gguf
    from flashjax.tokenizer import Tokenizer

    path = os.path.join(directory, "vocab.gguf")
    writer = gguf.GGUFWriter(path, "olmoe")
    add_tokenizer(writer, spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    try:
        return Tokenizer.from_gguf(path)
    finally:
        os.remove(path)


# -- the reference forward pass (numpy, float32) --------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))) * w


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """NEOX rotation (halves of each head), x [B, T, H, hd]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(x.shape[1], dtype=np.float64)[:, None] * inv
    cos, sin = np.cos(ang).astype(np.float32)[None, :, None], np.sin(ang).astype(np.float32)[None, :, None]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(spec: Spec, x: np.ndarray, w: dict) -> np.ndarray:
    b, t, d = x.shape
    h = rms_norm(x, w["attn_norm"], spec.norm_eps)
    q = rms_norm(h @ w["wq"].T, w["q_norm"], spec.norm_eps).reshape(b, t, spec.n_heads, spec.head_dim)
    k = rms_norm(h @ w["wk"].T, w["k_norm"], spec.norm_eps).reshape(b, t, spec.n_heads, spec.head_dim)
    v = (h @ w["wv"].T).reshape(b, t, spec.n_heads, spec.head_dim)
    q, k = rope(q, spec.rope_theta), rope(k, spec.rope_theta)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.float32(math.sqrt(spec.head_dim))
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    ctx = np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1)
    return ctx @ w["wo"].T, probs


def attention_stats(probs: np.ndarray, local: int, window: int = 4) -> dict:
    """Mean attention weight on the last `window` tokens (the token itself included), in the local
    heads and in the others, over positions that have at least 4 * window tokens behind them."""
    t = probs.shape[-1]
    if t <= 4 * window:
        return {"recent_attention_local": None, "recent_attention_other": None, "recent_window": window}
    dist = np.arange(t)[:, None] - np.arange(t)[None, :]
    near = ((dist >= 0) & (dist < window))[4 * window:]
    mass = (probs[:, :, 4 * window:] * near).sum(-1).mean(axis=(0, 2))  # per head
    return {"recent_attention_local": float(mass[:local].mean()) if local else None,
            "recent_attention_other": float(mass[local:].mean()) if local < len(mass) else None,
            "recent_window": window}


def route(spec: Spec, h: np.ndarray, router: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(experts [N, K], weights [N, K]) for inputs h [N, D]: softmax, top-k, not renormalized."""
    logits = (h @ router.T).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :spec.top_k]
    return experts, np.take_along_axis(probs, experts, axis=-1).astype(np.float32)


def routing_stats(spec: Spec, experts: np.ndarray, weights: np.ndarray, seqs: int) -> dict:
    """Usage of the experts by the held-out tokens (experts [N, K], N = seqs x probe_len)."""
    e, k = spec.n_experts, spec.top_k
    counts = np.bincount(experts.reshape(-1), minlength=e)
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(e))
    chosen = np.zeros((experts.shape[0], e), bool)
    np.put_along_axis(chosen, experts, True, axis=1)
    chosen = chosen.reshape(seqs, -1, e)
    overlap = float((chosen[:, 1:] & chosen[:, :-1]).sum(-1).mean() / k)
    p_chosen = counts / experts.shape[0]  # P(expert in a token's set)
    hot = max(1, round(0.1 * e))
    return {"usage": counts.tolist(), "entropy": entropy, "hottest_share": float(share.max()),
            "hottest_vs_mean": float(share.max() * e), "hottest_10pct_share": float(np.sort(share)[::-1][:hot].sum()),
            "unused_experts": int((counts == 0).sum()),
            "consecutive_overlap": overlap, "independent_overlap": float((p_chosen ** 2).sum() / k),
            "uniform_overlap": k / e, "topk_weight_mass": float(weights.sum(-1).mean())}


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# -- writing --------------------------------------------------------------------------------------


class Generator:
    """Makes the model's tensors in GGUF order and hands each to both writers, running the probe
    tokens through each layer as it is made."""

    def __init__(self, spec: Spec, gguf_writer, flash_writer, progress: bool = True):
        self.spec, self.gw, self.fw, self.progress = spec, gguf_writer, flash_writer, progress
        self.layout = flash_writer.layout
        self.checked = 0

    def rng(self, *key) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed] + [STREAMS[k] if isinstance(k, str) else int(k) for k in key])

    def _gguf(self, array: np.ndarray) -> None:
        self.gw.write_tensor_data(np.ascontiguousarray(array))

    def norm(self, path: str, n: int, gain: float, *key) -> np.ndarray:
        w = (gain * (1.0 + 0.05 * self.rng(*key).standard_normal(n))).astype(np.float32)
        self._gguf(w)
        self.fw.add(path, w)
        return w

    def matrix(self, path: str, design: np.ndarray, rng: np.random.Generator, check: bool = False) -> np.ndarray:
        """A 4-bit matrix (attention, router) from its float design: put on the grid, written as GGUF
        Q4_0 and flash q4; returns its values."""
        s = grid_step(_rms(design), 4)
        codes = to_codes(design, s, 4)
        pin_blocks(codes, 4, rng)
        blocks, rows = gguf_blocks(codes, s, 4), flash_rows(codes, s, 4)
        if check:
            check_encodings(path, codes, s, 4, blocks, (codes, "q4", rows.to_bytes()))
            self.checked += 1
        self._gguf(blocks)
        self.fw.add(path, rows)
        return values(codes, s)

    def attention_weights(self, i: int, calib_h: np.ndarray) -> dict:
        """Layer i's wq, wk, wv, wo: random (std 1 / sqrt(fan in)), and in the first `local_heads` of the
        heads a recency circuit. Those heads' queries and keys get the same vector c on an average
        token (c * m / |m|^2 added to wq and wk, m the mean normalized input on the calibration tokens).
        Under RoPE, c_rot(t) . c_rot(s) = sum_j |c_j|^2 cos((t - s) theta_j): c lives on the rotary
        pairs that turn by 1/16 to 1 radian per position, so the sum is largest at s = t and near zero
        past ~8 tokens, and these heads attend to the last few tokens (|c| is set so that the term spans
        `local_strength` in the attention logits). Their output projection is the transpose of their
        value projection (times `local_copy`), so they add an average of the recent inputs, in the
        same basis, to the residual stream: consecutive tokens' FFN inputs share it, and so do their
        routers' choices."""
        spec = self.spec
        d, q, hd = spec.d_model, spec.n_heads * spec.head_dim, spec.head_dim
        design = {name: self.rng(i, name).standard_normal(shape).astype(np.float32) / np.float32(math.sqrt(shape[1]))
                  for name, shape in (("wq", (q, d)), ("wk", (q, d)), ("wv", (q, d)), ("wo", (d, q)))}
        local = self.local_heads()
        if local:
            theta = spec.rope_theta ** (-np.arange(hd // 2) * 2.0 / hd)
            band = np.flatnonzero(theta >= 1 / 16)  # pairs j and j + hd/2 of each local head
            dims = (np.arange(local)[:, None, None] * hd + np.array([0, hd // 2])[None, :, None]
                    + band[None, None, :]).reshape(-1)
            # After the whole-projection q/k norm (RMS 1, times the norm weights ~QK_NORM_GAIN), c's elements
            # are a / sqrt(1 + frac a^2); the recency term is then gain^2 a^2 / (1 + frac a^2) * |dims per
            # head| / sqrt(hd) at s = t. Solve for a.
            frac = len(dims) / q
            x = spec.local_strength * math.sqrt(hd) / (QK_NORM_GAIN ** 2 * 2 * len(band))
            if frac * x >= 0.9:
                raise ValueError(f"local_strength {spec.local_strength} is out of reach for these heads")
            a = math.sqrt(x / (1 - frac * x))
            c = np.zeros(q)
            c[dims] = self.rng(i, "local").choice([-a, a], len(dims))
            m = calib_h.mean(0).astype(np.float64)
            along = np.outer(c, m / (m @ m)).astype(np.float32)
            design["wq"] += along
            design["wk"] += along
            design["wo"][:, :local * hd] = spec.local_copy * design["wv"][:local * hd].T
        return {name: self.matrix(f"layers.{i}.attn.{name}", design[name], self.rng(i, "pins", STREAMS[name]),
                                  check=name == "wq")
                for name in ("wq", "wk", "wv", "wo")}

    def local_heads(self) -> int:
        return 0 if self.spec.local_heads <= 0 else max(1, round(self.spec.n_heads * self.spec.local_heads))

    def table(self, path: str, key: str, noise_std: float, shared=None, probe_ids=None, probe_h=None):
        """The embedding (key "embed": returns the probe tokens' rows) or the head (key "head": returns
        the probe's logits for final hidden states probe_h), 8-bit, made EMBED_CHUNK rows at a time.
        `shared`: a vector added to every row (the embeddings' shared direction)."""
        spec = self.spec
        v, d = spec.vocab, spec.d_model
        std = math.sqrt(noise_std ** 2 + (0.0 if shared is None else float(np.mean(shared * shared))))
        s = grid_step(std, 8)
        codes = np.empty((v, d), np.int8)
        out = None if probe_h is None else np.empty((probe_h.shape[0], v), np.float32)
        for c, start in enumerate(range(0, v, EMBED_CHUNK)):
            stop = min(v, start + EMBED_CHUNK)
            rng = self.rng(key, c)
            w = rng.standard_normal((stop - start, d), dtype=np.float32) * np.float32(noise_std)
            if shared is not None:
                w += shared[None, :]
            block = to_codes(w, s, 8)
            pin_blocks(block, 8, rng)
            codes[start:stop] = block
            if out is not None:
                out[:, start:stop] = probe_h @ values(block, s).T
        blocks = gguf_blocks(codes, s, 8)
        head = codes[:min(v, 64)]
        check_encodings(path, head, s, 8, blocks[:head.shape[0]], (head, "q8", flash_rows(head, s, 8).to_bytes()))
        self.checked += 1
        self._gguf(blocks)
        del blocks
        self.fw.add(path, flash_rows(codes, s, 8))
        return out if probe_ids is None else values(codes[probe_ids], s)

    def run(self) -> dict:
        spec = self.spec
        d, k = spec.d_model, spec.top_k
        t0 = time.perf_counter()
        probe = self.rng("probe").integers(257, spec.vocab, (spec.probe_seqs, spec.probe_len))
        calib = spec.probe_seqs // 2  # the first half calibrates the routers, the second is measured
        u = self.rng("direction").standard_normal(d)
        u = (u / np.linalg.norm(u) * math.sqrt(d) * spec.shared_direction).astype(np.float32)
        x = self.table("embed.embedding", "embed", 1.0, shared=u, probe_ids=probe)
        layers = []
        for i in range(spec.n_layers):
            p = f"layers.{i}."
            attn_norm = self.norm(p + "attn_norm.scale", d, 1.0, i, "attn_norm")
            calib_x = x[:calib].reshape(-1, d)
            w = self.attention_weights(i, rms_norm(calib_x, attn_norm, spec.norm_eps))
            w["attn_norm"] = attn_norm
            q = spec.n_heads * spec.head_dim
            w["q_norm"] = self.norm(p + "attn.q_norm.scale", q, QK_NORM_GAIN, i, "q_norm")
            w["k_norm"] = self.norm(p + "attn.k_norm.scale", q, QK_NORM_GAIN, i, "k_norm")
            ffn_norm = self.norm(p + "ffn_norm.scale", d, 1.0, i, "ffn_norm")
            attn_out, probs = attention(spec, x, w)
            x = x + attn_out
            h = rms_norm(x, ffn_norm, spec.norm_eps).reshape(-1, d)
            router, ranks, bias_error = self.router(i, h[:calib * spec.probe_len])
            experts, weights = route(spec, h, router)
            moe_out = self.experts(i, h, experts, weights)
            x = x + moe_out.reshape(x.shape)
            held = slice(calib * spec.probe_len, None)
            stats = routing_stats(spec, experts[held], weights[held], spec.probe_seqs - calib)
            m = h[:calib * spec.probe_len].mean(0)
            stats.update(router_bias_error=bias_error, hot_experts=[int(j) for j in np.argsort(ranks)[:max(1, k)]],
                         residual_rms=_rms(x), attention_out_rms=_rms(attn_out), moe_out_rms=_rms(moe_out),
                         mean_input_share=float(m @ m / np.mean(np.sum(h * h, -1))),
                         **attention_stats(probs[calib:], self.local_heads()))
            layers.append(stats)
            if self.progress:
                log(f"  layer {i + 1}/{spec.n_layers}: usage entropy {stats['entropy']:.3f}, hottest expert "
                    f"{stats['hottest_vs_mean']:.1f}x the mean, consecutive overlap {stats['consecutive_overlap']:.2f} "
                    f"(independent {stats['independent_overlap']:.2f}), residual rms {stats['residual_rms']:.2f} "
                    f"[{time.perf_counter() - t0:.0f} s]")
        final_norm = self.norm("final_norm.scale", d, 1.0, "final_norm")
        final = rms_norm(x, final_norm, spec.norm_eps).reshape(-1, d)
        logits = self.table("lm_head", "head", spec.logit_std / math.sqrt(d), probe_h=final)
        return self.summary(probe, calib, layers, logits)

    def router(self, i: int, calib_h: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Layer i's router: random rows orthogonal to the mean input m plus each expert's popularity
        bias b_e along m (so that an average token's logit for expert e is b_e). The grid's pinned codes
        and rounding add a random bias of their own (about a logit at the default shape), so the rows
        are quantized three times, each time with the bias still missing folded back in. Returns the
        router's values, the popularity ranks and the bias error left (largest, in logits)."""
        spec = self.spec
        rng = self.rng(i, "router")
        ranks = self.rng(i, "router_rank").permutation(spec.n_experts)  # expert j's popularity rank
        logp = -spec.router_zipf * np.log(ranks + 1.0)
        bias = spec.router_skew * (logp - logp.mean())
        m = calib_h.mean(0).astype(np.float64)
        along = m / (m @ m)
        noise = rng.standard_normal((spec.n_experts, spec.d_model)) * spec.router_noise / math.sqrt(spec.d_model)
        noise -= np.outer(noise @ m, along)  # no popularity from the noise: only b_e sets it
        design = noise + np.outer(bias, along)
        s = grid_step(_rms(design), 4)
        pins = rng.bit_generator.state
        for _ in range(3):
            codes = to_codes(design.astype(np.float32), s, 4)
            rng.bit_generator.state = pins  # the same pinned positions every time
            pin_blocks(codes, 4, rng)
            error = bias - values(codes, s) @ m
            error -= error.mean()  # a logit added to every expert changes nothing
            design += np.outer(error, along)
        router = values(codes, s)
        self._gguf(router)  # F32 in the GGUF, as llama.cpp's converter keeps ffn_gate_inp
        self.fw.add(f"layers.{i}.ffn.router", flash_rows(codes, s, 4))
        return router, ranks, float(np.abs(error).max())

    def experts(self, i: int, h: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Makes layer i's experts one at a time (their GGUF blocks and flash records), runs the tokens
        routed to each, writes the layer; returns the MoE output [N, D]."""
        from flashjax.store.manifest import encode_part

        spec, layout = self.spec, self.layout
        d, e, f = spec.d_model, spec.n_experts, spec.expert_ffn
        records = np.empty((e * f, layout.record_width), np.uint8)
        gate_b = np.empty((e, f, _q4_0_bytes(d)), np.uint8)
        up_b = np.empty((e, f, _q4_0_bytes(d)), np.uint8)
        down_b = np.empty((e, d, _q4_0_bytes(f)), np.uint8)
        out = np.zeros_like(h)
        for j in range(e):
            rows = slice(j * f, (j + 1) * f)
            gate, gs = random_codes(self.rng(i, "gate", j), (f, d), 1 / math.sqrt(d), 4)
            up, us = random_codes(self.rng(i, "up", j), (f, d), 1 / math.sqrt(d), 4)
            down, ds = random_codes(self.rng(i, "down", j), (d, f), spec.down_gain / math.sqrt(f), 4, both_axes=True)
            gate_b[j], up_b[j], down_b[j] = gguf_blocks(gate, gs, 4), gguf_blocks(up, us, 4), gguf_blocks(down, ds, 4)
            down_rows = np.ascontiguousarray(down.T)  # a record holds neuron n's column of w_down
            for name, c, s in (("gate", gate, gs), ("up", up, us), ("down", down_rows, ds)):
                records[rows, layout.part_slice(name)] = encode_part(layout, name, flash_rows(c, s, 4), np.uint8)
            if j == 0:
                for name, c, s, blocks in (("gate", gate, gs, gate_b[0]), ("up", up, us, up_b[0]),
                                           ("down", down, ds, down_b[0])):
                    flash_codes = down_rows if name == "down" else c
                    check_encodings(f"layers.{i}.ffn.w_{name} (expert 0)", c, s, 4, blocks,
                                    (flash_codes, "q4", records[rows, layout.part_slice(name)]))
                self.checked += 3
            tok, slot = np.nonzero(experts == j)
            if len(tok):
                x = h[tok]
                g, u = x @ values(gate, gs).T, x @ values(up, us).T
                act = g / (1 + np.exp(-g)) * u
                np.add.at(out, tok, weights[tok, slot][:, None] * (act @ values(down, ds).T))
        for blocks in (gate_b, up_b, down_b):
            self._gguf(blocks)
        del gate_b, up_b, down_b
        self.fw.add_records(i, records)
        return out

    def summary(self, probe, calib, layers, logits) -> dict:
        spec = self.spec
        logits = logits.reshape(spec.probe_seqs, spec.probe_len, spec.vocab)
        argmax = logits.argmax(-1)
        finite = bool(np.isfinite(logits).all())
        std = float(logits.std(-1).mean()) if finite else float("nan")
        distinct = int(len(np.unique(argmax)))
        if not finite or std < 0.1 or distinct < 2:
            raise RuntimeError(f"the model's logits are degenerate (finite: {finite}, std {std}, {distinct} distinct "
                               f"argmax over {argmax.size} positions): check the weight scales")
        self.probe_logits = logits
        keys = ("entropy", "hottest_vs_mean", "hottest_10pct_share", "consecutive_overlap", "independent_overlap",
                "topk_weight_mass")
        return {
            "layers": layers,
            "summary": {key: float(np.mean([layer[key] for layer in layers])) for key in keys}
                       | {"uniform_overlap": spec.top_k / spec.n_experts,
                          "held_out_tokens": (spec.probe_seqs - calib) * spec.probe_len},
            "logits": {"finite": finite, "mean_std": std, "distinct_argmax": distinct, "positions": int(argmax.size)},
            "reference": {"tokens": probe[0].tolist(), "argmax": argmax[0].tolist(),
                          "note": "the first probe sequence and the numpy reference's argmax at each position "
                                  "(float32, the exact weights)"},
            "probe": {"sequences": spec.probe_seqs, "length": spec.probe_len, "calibration_sequences": calib,
                      "ids": "uniform random over 257..vocab-1 (the non-byte, non-special tokens)"},
        }


def _dir_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)


class WriteError(RuntimeError):
    """The model cannot be written here: existing output, too little disk space."""


def check_destination(out: str, spec: Spec, overwrite: bool) -> dict[str, int]:
    """Refuses an existing non-empty `out` (unless overwrite) and a disk without room; returns the
    estimated sizes."""
    if os.path.lexists(out) and not overwrite and not (os.path.isdir(out) and not os.listdir(out)):
        raise WriteError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    sizes = estimated_bytes(spec)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    need = int((sizes["flash"] + sizes["gguf"]) * 1.02) + (64 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise WriteError(f"{parent}: {free / 1e9:.2f} GB free, but the two copies need about {need / 1e9:.2f} GB "
                         f"(flash {sizes['flash'] / 1e9:.2f} GB + GGUF {sizes['gguf'] / 1e9:.2f} GB, with margin)")
    return sizes


def _move_into_place(tmp: str, out: str) -> None:
    old = None
    if os.path.lexists(out):
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        else:
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
            os.rmdir(old)
            os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


@dataclasses.dataclass
class Result:
    info: dict
    probe_logits: np.ndarray  # [probe_seqs, probe_len, vocab]: the numpy reference's logits
    probe_tokens: np.ndarray


def write(out, spec: Spec, overwrite: bool = False, progress: bool = True, scale: str = "custom",
          ffn_block: int | None = None) -> Result:
    """Writes out/flash, out/model.gguf and out/info.json (see the module docstring). `ffn_block`:
    neurons per block of the flash records (None: FlashWriter's choice, ~32 KiB blocks)."""
    import gguf
    from flashjax.store import FlashWriter

    spec.check()
    out = os.path.abspath(os.fspath(out))
    estimate = check_destination(out, spec, overwrite)
    cfg = model_config(spec)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
    os.chmod(tmp, 0o755)
    try:
        if progress:
            log(f"moe_synthetic: writing {cfg.param_count() / 1e9:.2f}B weights twice (flash "
                f"~{estimate['flash'] / 1e9:.2f} GB, GGUF ~{estimate['gguf'] / 1e9:.2f} GB) into {out}")
        tokenizer = make_tokenizer(spec, tmp)
        gguf_path = os.path.join(tmp, "model.gguf")
        gw = gguf.GGUFWriter(gguf_path, "olmoe")
        add_metadata(gw, spec, f"flashjax synthetic OLMoE ({scale}, seed {spec.seed})")
        for name, shape, kind in gguf_tensor_plan(spec):
            if kind == "F32":
                gw.add_tensor_info(name, shape, np.dtype(np.float32), _tensor_bytes(shape, kind))
            else:
                qtype = getattr(gguf.GGMLQuantizationType, kind)
                nbytes = _tensor_bytes(shape, kind)
                byte_shape = shape[:-1] + ((_q4_0_bytes if kind == "Q4_0" else _q8_0_bytes)(shape[-1]),)
                gw.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        gw.write_header_to_file()
        gw.write_kv_data_to_file()
        gw.write_ti_data_to_file()
        source = {"spec": f"synthetic:moe-{scale}", "path": "synthetic", "fmt": "synthetic",
                  "generator": "benchmarks/moe_synthetic.py", "seed": spec.seed}
        try:
            with FlashWriter(os.path.join(tmp, "flash"), cfg, dtype="q4", ffn_block=ffn_block,
                             source_info=source) as fw:
                fw.tokenizer = tokenizer
                generator = Generator(spec, gw, fw, progress)
                measured = generator.run()
        finally:
            gw.close()
        report = fw.manifest.source.get("quantization", [])
        if any(r["max_error"] != 0.0 for r in report):
            raise AssertionError(f"the flash writer changed some values: {report}")
        sizes = {"flash": _dir_size(os.path.join(tmp, "flash")), "gguf": os.path.getsize(gguf_path)}
        info = {
            "generator": {"script": "benchmarks/moe_synthetic.py", "scale": scale, "seed": spec.seed,
                          "spec": dataclasses.asdict(spec)},
            "files": {"flash": "flash", "gguf": "model.gguf"},
            "bytes": sizes,
            "parameters": {"total": cfg.param_count(),
                           "active_per_token": cfg.param_count() - 3 * cfg.n_layers * cfg.d_model * cfg.expert_ffn
                           * (cfg.n_experts - cfg.experts_per_token)},
            "config": dataclasses.asdict(cfg),
            "formats": {"gguf": {"experts": "Q4_0", "attention": "Q4_0", "token_embd": "Q8_0", "output": "Q8_0",
                                 "router": "F32", "norms": "F32"},
                        "flash": {"records": "q4", "ffn_block": fw.layout.ffn_block, "attention": "q4",
                                  "embedding": "q8", "lm_head": "q8",
                                  "router": "q4", "norms": "float32"},
                        "same_values": "every weight is s * k on a per-tensor float16 step s with each block's "
                                       "scale pinned, so both files hold exactly the same values",
                        "encodings_checked": generator.checked},
            "skew_model": {"router_zipf": spec.router_zipf, "router_skew": spec.router_skew,
                           "router_noise": spec.router_noise, "shared_direction": spec.shared_direction,
                           "local_heads": spec.local_heads, "local_strength": spec.local_strength,
                           "local_copy": spec.local_copy,
                           "description": "router_i = router_noise * N(0, 1/d) rows orthogonal to m_i + b_e * m_i / "
                                          "|m_i|^2, m_i the mean normalized FFN input of layer i on the calibration "
                                          "tokens (embeddings share a direction, so m_i is large), b_e = router_skew "
                                          "* (log p_e - mean log p), p_e ~ rank_e^-router_zipf over a random ranking "
                                          "per layer, the grid's own bias folded back in; local_heads of the heads "
                                          "attend to the last few tokens (RoPE recency term of local_strength "
                                          "logits) and add that average, times local_copy, to the residual stream"},
            "routing": measured,
            "write_seconds": round(time.perf_counter() - t0, 1),
        }
        with open(os.path.join(tmp, "info.json"), "w") as fh:
            json.dump(info, fh, indent=1)
        _move_into_place(tmp, out)
        tmp = None
        if progress:
            log(f"moe_synthetic: wrote {out} in {info['write_seconds']:.0f} s: flash {sizes['flash'] / 1e9:.3f} GB, "
                f"GGUF {sizes['gguf'] / 1e9:.3f} GB")
        return Result(info, generator.probe_logits, np.asarray(measured["reference"]["tokens"]))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def spec_from_args(args) -> Spec:
    spec = PRESETS[args.scale]
    overrides = {"n_layers": args.layers, "d_model": args.d_model, "n_experts": args.experts,
                 "expert_ffn": args.expert_ffn, "top_k": args.top_k, "n_heads": args.heads,
                 "head_dim": args.head_dim, "vocab": args.vocab, "router_zipf": args.router_zipf,
                 "router_skew": args.router_skew, "seed": args.seed}
    return dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", required=True, help="directory to write (flash/, model.gguf, info.json)")
    p.add_argument("--scale", default="olmoe", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object, last on stdout")
    p.add_argument("--ffn-block", type=int, default=None,
                   help="neurons per block of the flash records (default: the converter's, ~32 KiB blocks)")
    for flag, kind in (("--layers", int), ("--d-model", int), ("--experts", int), ("--expert-ffn", int),
                       ("--top-k", int), ("--heads", int), ("--head-dim", int), ("--vocab", int),
                       ("--router-zipf", float), ("--router-skew", float)):
        p.add_argument(flag, type=kind, default=None, help="override the preset")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the partial output is removed
    try:
        spec = spec_from_args(args)
        spec.check()
        result = write(args.out, spec, overwrite=args.overwrite, scale=args.scale, ffn_block=args.ffn_block)
    except (WriteError, ValueError) as e:  # ValueError: the shapes (Spec.check); both before any writing
        log(f"moe_synthetic: error: {e}")
        return 2
    if args.json:
        import resource

        report = dict(result.info, out=os.path.abspath(args.out),
                      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
