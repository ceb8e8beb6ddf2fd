"""flashjax: run language models whose weights do not fit in fast memory (LLM in a flash, in JAX)."""

__version__ = "0.1.0"


def load(model: str = "smollm2", **options):
    """Loads a model (built-in name, Hugging Face directory or GGUF file): see `flashjax.api.LLM.load`."""
    from flashjax.api import LLM
    return LLM.load(model, **options)


def __getattr__(name):
    # Keep `import flashjax` light: JAX is imported only when a model is used.
    if name in ("LLM", "StreamChunk"):
        from flashjax import api
        return getattr(api, name)
    if name == "GenerationResult":
        from flashjax.engine import GenerationResult
        return GenerationResult
    if name == "SamplingParams":
        from flashjax.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)
