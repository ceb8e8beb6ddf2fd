"""The Python API: load a model once, then generate or chat, streaming or not.

    import flashjax
    llm = flashjax.load("smollm2")
    print(llm.generate("The capital of France is", max_tokens=20).text)
    for chunk in llm.stream_chat([{"role": "user", "content": "Hi!"}]):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from flashjax.config import EngineConfig, ModelConfig
from flashjax.engine import DenseRunner, GenerationResult, generate_tokens
from flashjax.model.params import load_params, tree_nbytes
from flashjax.runner_protocol import Runner
from flashjax.sampling import SamplingParams, check_max_tokens
from flashjax.store import open_model_source


@dataclasses.dataclass
class StreamChunk:
    """One piece of streamed output. The last chunk carries the whole result."""

    text: str
    token: int | None
    result: GenerationResult | None = None


Messages = Sequence[dict] | str


class LLM:
    """A loaded model with its tokenizer and engine (a `runner_protocol.Runner`).

    `close()` releases the engine (the flash engine's prefetch thread and files); so does leaving
    `with flashjax.load(...) as llm:`.
    """

    def __init__(self, config: ModelConfig, params, tokenizer, engine_config: EngineConfig = EngineConfig(),
                 name: str = "", runner: Runner | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.engine_config = engine_config
        self.name = name
        self.runner: Runner = runner or DenseRunner(config, params, engine_config)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @classmethod
    def load(cls, model: str = "smollm2", *, compute_dtype: str = "float32", max_context: int | None = None,
             progress: bool = True, sparsity: str | None = None, memory_budget: str | int | None = None,
             verbose: bool = False, **flash_options) -> "LLM":
        """Loads a model.

        `model`: "smollm2" (the built-in default), a Hugging Face directory, a .gguf file, or a
        directory written by `flashjax convert`. `sparsity`: "dense" (every weight resident; the
        default without a budget), "naive" (the whole FFN read from disk each token), "hybrid"
        (naive plus a cache of what fits), "oracle" (the true active neurons; a measuring device),
        "predictor" (the calibrated predictors; the default with a budget once `flashjax calibrate`
        has run, else oracle) or "gate" (SwiGLU gate resident) — all but dense need a converted model.
        `memory_budget`: bytes, "300MB", "2GiB" or "50%" of what the dense engine holds.
        Other keywords go to `flashjax.flash.runner.FlashOptions` (window, prefetch_depth,
        scratch_rows, concurrency, threshold, evict_page_cache, verify, selection,
        predictor_threshold, top_k, over_select, lookahead, devices, host_cache, staging,
        resident_dtype, cache_dtype).
        `devices=N` splits the model over N devices. The dense engine splits FFN neurons, attention
        heads (where the kv heads divide by N) and the vocabulary (`flashjax.tensor_parallel`); the
        flash engine splits each layer's FFN neurons (a converted model with no sparsity given runs
        the flash engine with every neuron cached, as "hybrid").
        """
        from flashjax.flash.selection import SPARSITY_MODES
        from flashjax.store import is_flash_dir

        engine_config = EngineConfig(compute_dtype=compute_dtype, max_context=max_context)
        several_devices = flash_options.get("devices", 1) > 1
        if sparsity is None:
            sparsity = "dense"
            if several_devices and memory_budget is None and is_flash_dir(str(model)):
                sparsity = "hybrid"  # unlimited: every neuron cached, split across the devices
            elif memory_budget is not None and is_flash_dir(str(model)) and _is_moe(str(model)):
                sparsity = "hybrid"  # a mixture of experts: its router chooses; the experts that fit stay cached
            elif memory_budget is not None:
                from flashjax.sparsity import has_predictors
                # Once calibrated, the predictors are the default way to pick neurons under a budget.
                sparsity = "predictor" if is_flash_dir(str(model)) and has_predictors(str(model)) else "oracle"
        if sparsity not in SPARSITY_MODES:
            raise ValueError(f"unknown sparsity {sparsity!r}; choose one of {', '.join(SPARSITY_MODES)}")
        if sparsity != "dense":
            if not is_flash_dir(str(model)):
                raise ValueError(f"--sparsity {sparsity} reads FFN weights from a converted model, and {model} is "
                                 f"not one: run `flashjax convert {model} OUT` and pass --model OUT")
            from flashjax.flash.runner import FlashOptions, FlashRunner
            from flashjax.store import open_flash_model

            options = FlashOptions(sparsity=sparsity, memory_budget=memory_budget, **flash_options)
            flash_model = open_flash_model(model, verify=options.verify)
            runner = FlashRunner(flash_model, options, engine_config, verbose=verbose)
            return cls(flash_model.config, runner.params, _tokenizer_or_none(flash_model.tokenizer), engine_config,
                       name=str(model), runner=runner)
        if is_flash_dir(str(model)):
            from flashjax.store import open_flash_model

            flash_model = open_flash_model(model, verify=flash_options.get("verify", True))
            if flash_model.quantized:
                # Dense on a quantized model: every weight in memory as stored (as llama.cpp holds its
                # file), multiplied through the dequantizing matmul; never a float copy of the model.
                if flash_options.get("devices", 1) > 1:
                    raise ValueError(f"{model} is quantized ({flash_model.manifest.dtype}): the dense engine "
                                     f"runs it on one device; pass --memory-budget to split it with the flash engine")
                if memory_budget is not None:
                    raise ValueError("the dense engine holds every weight: drop --memory-budget or pick a "
                                     "--sparsity that streams (hybrid, predictor, ...)")
                params = flash_model.load_quantized_params()
                return cls(flash_model.config, params, _tokenizer_or_none(flash_model.tokenizer), engine_config,
                           name=str(model), runner=DenseRunner(flash_model.config, params, engine_config))
        source = open_model_source(model)
        if memory_budget is not None:
            from flashjax.flash.budget import dense_weight_bytes, parse_budget
            need = dense_weight_bytes(source.config, compute_dtype)
            if parse_budget(memory_budget, need) < need:
                raise ValueError(f"the dense engine holds {need / 1e6:.1f} MB of weights, over the "
                                 f"{memory_budget} budget: use --sparsity naive or oracle on a converted model")
        devices = flash_options.get("devices", 1)
        if devices == 1:
            params = load_params(source, jnp.dtype(compute_dtype), progress=progress)
            runner = DenseRunner(source.config, params, engine_config)
        else:
            from flashjax.tensor_parallel import TensorParallel

            parallel = TensorParallel.make(source.config, devices)  # a clear error past jax.device_count()
            if verbose:
                import sys
                print(f"flashjax: dense engine on {parallel.describe()}", file=sys.stderr)
            params = parallel.load_params(source, jnp.dtype(compute_dtype), progress=progress)
            runner = DenseRunner(source.config, params, engine_config, parallel)
        return cls(source.config, params, _tokenizer_or_none(source.tokenizer), engine_config, name=str(model),
                   runner=runner)

    # ---- token level ------------------------------------------------------

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        return ids or self.config.eos_token_ids

    def generate_ids(self, prompt_ids: Sequence[int], *, max_tokens: int = 256,
                     sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True):
        """Generator of token ids; its return value (StopIteration.value) is the stats dict."""
        max_tokens = check_max_tokens(max_tokens)
        eos = self.eos_token_ids if stop_at_eos else ()
        return generate_tokens(self.runner, self.config, self.engine_config, prompt_ids, max_tokens, sampling, eos)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] for every position of `token_ids` in one forward pass (float32; dense engine)."""
        if not self.runner.one_pass_logits:
            raise NotImplementedError("logits() needs every weight resident: load with sparsity='dense'")
        return self.runner.sequence_logits(np.asarray(token_ids, np.int32))

    @property
    def weight_bytes(self) -> int:
        return tree_nbytes(self.params)

    # ---- text level -------------------------------------------------------

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
               ) -> Iterator[StreamChunk]:
        """Streams a continuation of the raw prompt (text or token ids)."""
        max_tokens, sampling = check_max_tokens(max_tokens), SamplingParams(temperature, top_k, top_p, seed)
        self._require_tokenizer()
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            prompt_ids = [int(t) for t in prompt]
        return self._stream(prompt_ids, max_tokens, sampling, stop_at_eos)

    def generate(self, prompt: str | Sequence[int], **options) -> GenerationResult:
        """Like `stream`, but returns the whole result at once."""
        return _last(self.stream(prompt, **options)).result

    def stream_chat(self, messages: Messages, **options) -> Iterator[StreamChunk]:
        """Applies the model's chat template, then streams the reply."""
        self._require_tokenizer()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        return self.stream(self.tokenizer.encode(text, add_special_tokens=False), **options)

    def chat(self, messages: Messages, **options) -> GenerationResult:
        return _last(self.stream_chat(messages, **options)).result

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.name or 'this model'} has no tokenizer: pass token ids (generate_ids)")
        return self.tokenizer

    def _stream(self, prompt_ids, max_tokens, sampling, stop_at_eos) -> Iterator[StreamChunk]:
        from flashjax.tokenizer import StreamDecoder

        decoder = StreamDecoder(self.tokenizer)
        eos = set(self.eos_token_ids) if stop_at_eos else set()
        tokens: list[int] = []
        gen = self.generate_ids(prompt_ids, max_tokens=max_tokens, sampling=sampling, stop_at_eos=stop_at_eos)
        while True:
            try:
                token = next(gen)
            except StopIteration as done:
                stats = done.value
                break
            tokens.append(token)
            # The end-of-sequence token ends the text; it is not part of it.
            piece = "" if token in eos else decoder.feed(token)
            if piece:
                yield StreamChunk(piece, token)
        tail = decoder.flush()
        text_tokens = [t for t in tokens if t not in eos]
        result = GenerationResult(self.tokenizer.decode(text_tokens), list(prompt_ids), tokens,
                                  stats["finish_reason"], stats)
        yield StreamChunk(tail, None, result)


def _tokenizer_or_none(factory):
    """The model's tokenizer, or None when it has none (token ids still work)."""
    from flashjax.tokenizer import TokenizerError

    try:
        return factory()
    except TokenizerError as e:
        import sys
        print(f"flashjax: warning: {e}; only token ids can be used", file=sys.stderr)
        return None


def _last(iterator):
    item = None
    for item in iterator:
        pass
    return item


def load(model: str = "smollm2", **options) -> LLM:
    """Loads a model: see `LLM.load`."""
    return LLM.load(model, **options)


def _is_moe(flash_dir: str) -> bool:
    from flashjax.store import read_manifest
    return read_manifest(flash_dir).config.is_moe
