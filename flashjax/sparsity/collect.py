"""Running the dense model over calibration tokens and recording, per layer, what the engine holds
when it must choose neurons and what it would have needed.

For each layer l and each sampled token position:

- `x`: the FFN input h = ffn_input(cfg, layer, x), the normed residual after attention (what the
  engine has in hand when it picks layer l's neurons);
- `a`: each neuron's activation magnitude, relu(up) for ReLU/OPT, |silu(gate) * up| for SwiGLU;
- `x_prev`: layer l-1's FFN input (the embedding output for layer 0), the lookahead predictor's input.

Calibration sequences are fixed length, so one compile serves them all; one jitted forward per
sequence returns only the sampled positions, so memory stays bounded by `max_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flashjax.config import ModelConfig
from flashjax.model.layers import dense_ffn_apply
from flashjax.model.transformer import embed, final_logits, forward, init_kv_cache

# Above this many bytes of float32 activations, the collected arrays are stored as float16.
FLOAT16_ABOVE_BYTES = 256 * 1024 * 1024
_F16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass
class LayerActivations:
    """Calibration data of one layer; rows are token positions, in sequence order."""

    layer: int
    x: np.ndarray  # [N, D] FFN input
    a: np.ndarray  # [N, F] activation magnitude (>= 0)
    x_prev: np.ndarray  # [N, D] previous layer's FFN input (embedding output for layer 0)


@dataclasses.dataclass
class Activations:
    """What `collect_activations` returns: per-layer data sharing the FFN input arrays (layer l's
    `x_prev` is layer l-1's `x`, the same array), plus where each row came from."""

    layers: dict  # layer -> LayerActivations
    sequence: np.ndarray  # [N] index of the calibration sequence each row comes from
    position: np.ndarray  # [N] its position in that sequence

    def __getitem__(self, layer: int) -> LayerActivations:
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def n_tokens(self) -> int:
        return len(self.sequence)


def _record_ffn(record: list):
    """The dense FFN that also appends each call's (h, |activation|)."""

    def ffn(c: ModelConfig, p, h):
        if c.is_moe:
            record.append((h, jnp.abs(expert_activations(c, p, h))))
            return dense_ffn_apply(c, p, h)
        return dense_ffn_apply(c, p, h, on_activations=lambda act: record.append((h, jnp.abs(act))))

    return ffn


def expert_activations(cfg: ModelConfig, ffn_params, h):
    """A mixture of experts' raw activations [B, T, n_experts * expert_ffn]: every expert's neurons,
    not weighed by the router. A neuron's activation for an input is defined whether or not its
    expert is routed; the routed FFN zeroes the others, which would teach a predictor the router's
    choice instead of the neuron's (the engine applies the router itself and the predictor inside
    the routed experts). The same FFN seen as one dense FFN without its router: under jit its
    unused down projection is dropped."""
    acts = []
    dense = dataclasses.replace(cfg, n_experts=0, experts_per_token=0)
    dense_ffn_apply(dense, {k: v for k, v in ffn_params.items() if k != "router"}, h, on_activations=acts.append)
    return acts[0]


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _collect_step(cfg: ModelConfig, params, tokens, picks, layers: tuple):
    """Dense forward of tokens [B, T]; at positions picks [B, K] returns the embedding output [B, K, D],
    every layer's FFN input [L, B, K, D] and the |activations| of `layers` [len(layers), B, K, F]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    record: list = []
    forward(cfg, params, tokens, positions, 0, init_kv_cache(cfg, b, t), ffn=_record_ffn(record))

    def take(v):  # [B, T, ...] -> [B, K, ...]
        return jnp.take_along_axis(v, picks[..., None], axis=1)

    emb = take(embed(cfg, params, tokens, positions))
    xs = jnp.stack([take(h) for h, _ in record])
    acts = jnp.stack([take(record[l][1]) for l in layers])
    return emb, xs, acts


def _as_rows(batch) -> np.ndarray:
    arr = np.asarray(batch, dtype=np.int32)
    return arr[None] if arr.ndim == 1 else arr


def collect_activations(cfg: ModelConfig, params, token_batches: Iterable, layers: Sequence[int] | None = None,
                        max_tokens: int = 8192, seed: int = 0, store_dtype=None, skip_first: bool = True,
                        progress: bool = True) -> Activations:
    """Runs the dense model over `token_batches` (each [T] or [B, T] token ids, all the same T) and
    records, at up to `max_tokens` sampled positions spread evenly over the sequences, each layer's
    FFN input, activation magnitudes and previous FFN input (see the module docstring).

    `params`: the full parameter tree (`load_params(open_model_source(path))`). `layers`: which
    layers' activations to keep (default all; FFN inputs are always kept, they are small).
    `store_dtype`: None picks float16 when the float32 activations would exceed 256 MB, float32
    otherwise. `skip_first`: leave out position 0 of every sequence, whose activations are outliers
    (attention sink) the decode steps never see.
    """
    batches = [_as_rows(b) for b in token_batches]
    if not batches:
        raise ValueError("no calibration tokens")
    seq_len = batches[0].shape[1]
    if any(b.shape[1] != seq_len for b in batches):
        raise ValueError("every calibration sequence must have the same length (one compile serves them all)")
    if seq_len > cfg.max_position:
        raise ValueError(f"sequence length {seq_len} exceeds the model's context ({cfg.max_position})")
    layers = tuple(range(cfg.n_layers)) if layers is None else tuple(sorted({int(l) for l in layers}))
    n_rows = sum(b.shape[0] for b in batches)
    first = 1 if skip_first and seq_len > 1 else 0
    per_row = max(1, min(seq_len - first, math.ceil(max_tokens / n_rows)))
    n = min(max_tokens, n_rows * per_row)
    if store_dtype is None:
        store_dtype = np.float16 if n * cfg.d_ffn * len(layers) * 4 > FLOAT16_ABOVE_BYTES else np.float32
    store_dtype = np.dtype(store_dtype)

    xs = np.empty((cfg.n_layers + 1, n, cfg.d_model), store_dtype)  # row 0: embedding output
    acts = {l: np.empty((n, cfg.d_ffn), store_dtype) for l in layers}
    sequence = np.empty(n, np.int32)
    position = np.empty(n, np.int32)
    rng = np.random.default_rng(seed)
    filled, seq_index = 0, 0
    bar = tqdm(total=n, unit="tok", desc="collecting activations", file=sys.stderr, disable=not progress,
               leave=False)
    for batch in batches:
        if filled >= n:
            break
        # Every row samples the same number of positions: one compile for the whole run.
        picks = np.sort(np.stack([rng.choice(np.arange(first, seq_len), per_row, replace=False)
                                  for _ in range(batch.shape[0])]), axis=1).astype(np.int32)
        emb, x, a = _collect_step(cfg, params, batch, picks, layers)
        take = min(batch.shape[0] * per_row, n - filled)
        sl = slice(filled, filled + take)
        xs[0, sl] = _fit(np.asarray(emb).reshape(-1, cfg.d_model)[:take], store_dtype)
        xs[1:, sl] = _fit(np.asarray(x).reshape(cfg.n_layers, -1, cfg.d_model)[:, :take], store_dtype)
        a = np.asarray(a).reshape(len(layers), -1, cfg.d_ffn)
        for i, l in enumerate(layers):
            acts[l][sl] = _fit(a[i, :take], store_dtype)
        sequence[sl] = np.repeat(np.arange(seq_index, seq_index + batch.shape[0]), per_row)[:take]
        position[sl] = picks.reshape(-1)[:take]
        seq_index += batch.shape[0]
        filled += take
        bar.update(take)
    bar.close()
    out = {l: LayerActivations(l, xs[l + 1, :filled], acts[l][:filled], xs[l, :filled]) for l in layers}
    return Activations(out, sequence[:filled], position[:filled])


def _fit(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # float16 tops out at 65504: clip rather than store inf (order, all a threshold needs, is kept).
    if dtype == np.float16:
        values = np.clip(values, -_F16_MAX, _F16_MAX)
    return values.astype(dtype, copy=False)


# -- calibration sequences --------------------------------------------------------------------------


def token_sequences(token_lists: Iterable[Sequence[int]], seq_len: int, max_sequences: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """Packs documents (token id lists) end to end and cuts the stream into sequences [S, seq_len].

    With `max_sequences`, keeps that many, spread evenly over the whole stream (a long file is
    sampled throughout, not just its start). A stream shorter than one sequence gives one sequence
    of its own length.
    """
    stream = np.concatenate([np.asarray(t, np.int32) for t in token_lists if len(t)] or [np.zeros(0, np.int32)])
    if len(stream) == 0:
        raise ValueError("the calibration text is empty")
    if len(stream) < seq_len:
        return stream[None]
    chunks = stream[:len(stream) // seq_len * seq_len].reshape(-1, seq_len)
    if max_sequences is not None and len(chunks) > max_sequences:
        rng = np.random.default_rng(seed)
        edges = np.linspace(0, len(chunks), max_sequences + 1)
        keep = [int(rng.integers(int(lo), max(int(lo) + 1, int(hi)))) for lo, hi in zip(edges[:-1], edges[1:])]
        chunks = chunks[np.unique(keep)]
    return chunks


# -- self-generated calibration text -----------------------------------------------------------------

SEED_PROMPTS = (
    "Explain how photosynthesis works to a high-school student.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What were the main causes of the First World War?",
    "Give me a recipe for a vegetarian lasagna, with a shopping list.",
    "Solve step by step: a train travels 180 km in 2.5 hours. What is its average speed?",
    "Write a polite email to a landlord asking for a broken heater to be repaired.",
    "Compose a poem about autumn rain in a city.",
    "List ten tips for studying effectively for exams.",
    "What is the difference between a virus and a bacterium?",
    "Describe the plot of a heist movie set on a space station.",
    "How do I set up a Git repository and push it to a remote server?",
    "Summarize the theory of supply and demand with an example.",
    "Translate into French and explain the grammar: 'I would have come if I had known.'",
    "What should a beginner know before running their first marathon?",
    "Write a dialogue between a detective and a suspect in a small village.",
    "Explain recursion in programming using a real-world analogy.",
    "Describe the water cycle and why it matters for agriculture.",
    "Write a product description for a solar-powered backpack.",
    "What are the pros and cons of working from home? Give a balanced answer.",
)


def _prompt_ids(tokenizer, vocab_size: int, n: int, seed: int) -> list[list[int]]:
    """The seed prompts as token ids: chat-templated when the model has a template, raw text when it
    has only a tokenizer, random tokens when it has neither (tiny test models)."""
    if tokenizer is None:
        rng = np.random.default_rng(seed)
        return [list(rng.integers(0, vocab_size, 8)) for _ in range(n)]
    out = []
    for i in range(n):
        prompt = SEED_PROMPTS[i % len(SEED_PROMPTS)]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            out.append(tokenizer.encode(prompt, add_special_tokens=True))
    return out


def _row_forward(cfg, params, tokens, positions, start, kv):
    """One row's forward (tokens [T]) at its own cache slot: vmapped, so rows advance independently."""
    x, kv = forward(cfg, params, tokens[None], positions[None], start, kv)
    return final_logits(cfg, params, x)[0], kv


def _sample_top_k(logits, key, temperature, k: int = 50):
    """Temperature sampling among each row's k most likely tokens: logits [B, V] -> [B]. (The
    engine's top-p sorts the whole vocabulary, which costs more than the model step here.)"""
    values, ids = jax.lax.top_k(logits.astype(jnp.float32), min(k, logits.shape[-1]))
    choice = jax.random.categorical(key, values / temperature, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _prefill_rows(cfg: ModelConfig, params, tokens, lengths, cache, key, temperature):
    # tokens [B, P] right-padded: a pad slot is only seen by later pad queries, and is overwritten
    # by the row's own decode steps before any real query reaches it. Pads keep the row's last
    # position (engine.prompt_positions: LongRoPE reads the largest).
    positions = jnp.minimum(jnp.arange(tokens.shape[1])[None], (lengths - 1)[:, None])
    run = jax.vmap(lambda t, p, kv: _row_forward(cfg, params, t, p, 0, kv))
    logits, cache = run(tokens, positions, cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return _sample_top_k(last, key, temperature), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_rows(cfg: ModelConfig, params, token, pos, cache, key, temperature):
    # token [B], pos [B]: every row at its own position.
    run = jax.vmap(lambda t, p, kv: _row_forward(cfg, params, t[None], p[None], p, kv))
    logits, cache = run(token, pos, cache)
    return _sample_top_k(logits[:, 0], key, temperature), cache


def generate_calibration_ids(cfg: ModelConfig, params, tokenizer=None, n_tokens: int = 8192,
                             max_new: int = 384, temperature: float = 0.8, seed: int = 0,
                             progress: bool = True) -> list[list[int]]:
    """Token ids of text the model writes itself from the built-in seed prompts (prompt + reply per
    list), about `n_tokens` in all, sampled at `temperature` among the 50 likeliest tokens. The
    prompts run side by side as one batch, each row at its own position (vmapped); rounds of new
    samples (new keys) follow until enough tokens are written. A reply ends at end-of-sequence."""
    n_rows = len(SEED_PROMPTS)
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or cfg.eos_token_ids)
    out: list[list[int]] = []
    total, round_ = 0, 0
    bar = tqdm(total=n_tokens, unit="tok", desc="writing calibration text", file=sys.stderr,
               disable=not progress, leave=False)
    while total < n_tokens:
        prompts = _prompt_ids(tokenizer, cfg.vocab_size, n_rows, seed + round_)
        plen = max(len(p) for p in prompts)
        steps = max(1, min(max_new, math.ceil((n_tokens - total) / n_rows) + 16, cfg.max_position - plen))
        capacity = -(-(plen + steps) // 64) * 64
        if capacity > cfg.max_position:
            capacity = plen + steps
        tokens = np.zeros((n_rows, plen), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        cache = [(k[:, None], v[:, None]) for k, v in init_kv_cache(cfg, n_rows, capacity)]
        key = jax.random.PRNGKey(seed * 1000 + round_)
        temp = np.float32(temperature)
        token, cache = _prefill_rows(cfg, params, tokens, lengths, cache, key, temp)
        rows = [list(p) for p in prompts]
        done = np.zeros(n_rows, bool)
        for step in range(steps):
            host = np.asarray(token)
            for i in np.flatnonzero(~done):
                rows[i].append(int(host[i]))
                total += 1
                bar.update(1)
                done[i] |= int(host[i]) in eos
            # Rows past their own context stop too (prompts differ in length).
            done |= lengths + step + 1 >= capacity
            if done.all() or total >= n_tokens:
                break
            token, cache = _decode_rows(cfg, params, token, lengths + step, cache,
                                        jax.random.fold_in(key, step + 1), temp)
        out.extend(rows)
        total += sum(len(p) for p in prompts)
        bar.update(sum(len(p) for p in prompts))
        round_ += 1
    bar.close()
    return out


def default_calibration_text(llm_or_params, n_tokens: int = 8192, seed: int = 0, temperature: float = 0.8,
                             progress: bool = True) -> list[str]:
    """Calibration text the model writes itself (no download, no files): one string per sample, the
    chat-templated seed prompt followed by the reply. `llm_or_params`: a loaded dense `flashjax.LLM`,
    or a (ModelConfig, params, tokenizer) triple."""
    if isinstance(llm_or_params, tuple):
        cfg, params, tokenizer = llm_or_params
    else:
        cfg, params, tokenizer = llm_or_params.config, llm_or_params.params, llm_or_params.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer, so it cannot write text: use generate_calibration_ids")
    ids = generate_calibration_ids(cfg, params, tokenizer, n_tokens, temperature=temperature, seed=seed,
                                   progress=progress)
    return [tokenizer.decode(t) for t in ids]
