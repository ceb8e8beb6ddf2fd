"""Text <-> token ids for flashjax, built from a GGUF file's metadata or a Hugging Face model directory.

Both sources are turned into one `tokenizers.Tokenizer` (the Rust library behind Hugging Face's fast
tokenizers), so encoding and decoding run in native code and behave like the model's own tokenizer:

    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    stream = StreamDecoder(tok)
    for token_id in generated:
        print(stream.feed(token_id), end="")
    print(stream.flush())

A GGUF has no tokenizer.json: it stores the vocabulary and merges under llama.cpp's `tokenizer.ggml.*`
keys and names the pre-tokenizer (how text is cut into words before BPE) with `tokenizer.ggml.pre`.
We rebuild the pipeline the model was trained with from those. Where transformers' own GGUF conversion
differs from the model's original tokenizer we follow the original (and llama.cpp, which agrees with
it); each such place says so below.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
from typing import Any, Callable, Iterable

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE


class TokenizerError(ValueError):
    """A tokenizer could not be built or used: the message names the file and what is wrong."""


# llama.cpp token types (gguf.TokenType). Unknown and control tokens are special: matched whole in
# the text and dropped by decode(skip_special_tokens=True). User-defined ones (like `<think>`) are
# matched whole too, but are ordinary text.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Tokens that llama.cpp treats as end-of-generation whatever the metadata says (llama-vocab.cpp,
# "special_eog_ids"), so that e.g. SmolLM2 stops on <|endoftext|> as well as on its eos <|im_end|>.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>", "<|return|>", "<|call|>", "<end_of_utterance>",
})

# Pre-tokenizer regexes from the original tokenizer.json files (llama.cpp has the same ones).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_bytes() -> pre_tokenizers.PreTokenizer:
    # GPT-2's regex ('s|'t|...| ?\p{L}+| ?\p{N}+|...) built into ByteLevel, then bytes -> printable chars.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _smollm() -> pre_tokenizers.PreTokenizer:
    # SmolLM2's tokenizer.json: every digit on its own, then the GPT-2 regex. llama.cpp's SMOLLM
    # pre-type is the same ("\p{N}" split first). transformers (5.x) does not know "smollm" and
    # falls back to the plain GPT-2 regex. Since the vocabulary has no merges with digits, that only
    # shows when whitespace comes right before a digit: "a  1" is original [a, ĠĠ, 1] but
    # transformers [a, Ġ, Ġ, 1], because GPT-2's regex leaves one space to join the number (" ?\p{N}+")
    # while splitting digits first ends the whitespace run before the digit.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_bytes()])


@dataclasses.dataclass(frozen=True)
class _BytePre:
    """How one `tokenizer.ggml.pre` value cuts text before byte-level BPE."""
    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a word that is in the vocabulary is one token (Llama 3)
    nfc: bool = False  # Unicode NFC first (Qwen2's tokenizer.json; transformers' GGUF path skips it)


_GPT2 = _BytePre(_gpt2_bytes)
_LLAMA3 = _BytePre(functools.partial(_split_then_bytes, _LLAMA3_SPLIT), ignore_merges=True)
_BYTE_LEVEL_PRE = {
    "default": _GPT2,  # as transformers; llama.cpp's legacy "default" regexes are a fallback for old files
    "gpt2": _GPT2,
    "gpt-2": _GPT2,  # llama.cpp's spelling
    "smollm": _BytePre(_smollm),
    "llama-bpe": _LLAMA3,  # Llama 3; the other two are older names for it
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _BytePre(functools.partial(_split_then_bytes, _QWEN2_SPLIT), nfc=True),
}
_SUPPORTED_MODELS = ("gpt2", "llama")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A model's tokenizer: encode, decode, end-of-generation ids and chat template."""

    backend: tokenizers.Tokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # every id that ends generation, the model's eos first
    chat_template: str | None = None
    bos_token: str | None = None  # the strings chat templates see as `bos_token` / `eos_token`
    eos_token: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        meta = _GGUFMetadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind not in _SUPPORTED_MODELS:
            raise TokenizerError(f"{meta.path}: tokenizer model {kind!r} is not supported "
                                 f"(supported: {', '.join(_SUPPORTED_MODELS)})")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
        vocab = {token: index for index, token in enumerate(tokens)}

        if kind == "gpt2":
            backend, add_bos = _build_byte_level(meta, vocab)
        else:
            backend, add_bos = _build_sentencepiece(meta, vocab, tokens, types)

        # Special tokens are looked up whole before BPE runs, as llama.cpp does with parse_special.
        # They are already in the vocabulary, so this keeps their ids.
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, ty in zip(tokens, types) if ty in (_UNKNOWN, _CONTROL)])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

        def token_id(key):
            value = meta.get(key, None)
            if value is not None and not 0 <= value < len(tokens):
                raise TokenizerError(f"{meta.path}: {key} = {value} is outside the vocabulary of {len(tokens)}")
            return value

        bos = token_id("tokenizer.ggml.bos_token_id")
        eos = token_id("tokenizer.ggml.eos_token_id")
        eos_ids = [eos] + [token_id(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        eos_ids += [i for i, t in enumerate(tokens) if t in _EOG_TEXTS]
        add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos)
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        _set_post_processor(backend, tokens[bos] if add_bos and bos is not None else None, bos,
                            tokens[eos] if add_eos and eos is not None else None, eos)
        return cls(backend=backend, bos_token_id=bos, eos_token_ids=_unique(eos_ids),
                   chat_template=meta.get("tokenizer.chat_template", None),
                   bos_token=None if bos is None else tokens[bos],
                   eos_token=None if eos is None else tokens[eos])

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Builds the tokenizer of a Hugging Face model directory (tokenizer.json and its configs)."""
        directory = pathlib.Path(path)
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerError(f"{tokenizer_json}: cannot be loaded: {e}") from e
        # tokenizer_config.json wins over the legacy special_tokens_map.json, as in transformers.
        config = {**_read_json(directory / "special_tokens_map.json"),
                  **_read_json(directory / "tokenizer_config.json")}
        # Only names and ids are read here: adding BOS/EOS is left to tokenizer.json's post-processor.
        # transformers 5 does the same (it ignores add_bos_token/add_eos_token next to a tokenizer.json).
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        eos_ids = [backend.token_to_id(eos) if eos else None]
        for name in ("generation_config.json", "config.json"):
            value = _read_json(directory / name).get("eos_token_id")
            eos_ids += value if isinstance(value, list) else [value]

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        jinja_file = directory / "chat_template.jinja"  # newer transformers save it on its own
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend=backend, bos_token_id=bos_id, eos_token_ids=_unique(eos_ids),
                   chat_template=template, bos_token=bos, eos_token=eos)

    # -- using ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (like `<|im_start|>`) are always
        recognised; `add_special_tokens` adds the BOS/EOS the model's metadata asks for."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables) -> str:
        """Renders `messages` with the model's chat template, as transformers does (extra keyword
        arguments, like `tools`, are passed to the template)."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template (tokenizer.chat_template / "
                                 "tokenizer_config.json chat_template); format the prompt yourself")
        import jinja2  # only needed for chat
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **variables}
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e


class StreamDecoder:
    """Turns token ids into text as they are generated.

    Decoding one token at a time is wrong in two ways: a character can span tokens (an emoji is 4
    bytes, often 2 tokens), and some decoders depend on neighbours (SentencePiece drops the space
    of the first token). So we decode a small window: the previous chunk plus the new tokens, and
    return what the new tokens added, holding it back while it ends in an incomplete UTF-8
    sequence (decoded as U+FFFD). `flush()` returns whatever is still held at the end.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: the chunk before the unread tokens
        self._read = 0  # tokens before this have been returned as text

    def _delta(self) -> str:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        return decode(self.ids[self._prefix:])[len(decode(self.ids[self._prefix:self._read])):]

    def feed(self, token_id: int) -> str:
        """Adds one token; returns the text that is now safe to print (maybe "")."""
        self.ids.append(int(token_id))
        new = self._delta()
        if not new or new.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def flush(self) -> str:
        """Returns the text still held back (an incomplete character stays as U+FFFD)."""
        new = self._delta()
        self._prefix = self._read = len(self.ids)
        return new


# -- helpers ------------------------------------------------------------------------------------

_REQUIRED = object()


class _GGUFMetadata:
    """The `tokenizer.*` metadata of a GGUF file; reading it maps the file but no tensor data."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"GGUF file not found: {self.path}")
        from flashjax.weights.gguf_format import GGUFContainer, GGUFFormatError
        try:
            self._fields = GGUFContainer(self.path).fields
        except GGUFFormatError as e:  # bad magic, truncated file, ...
            raise TokenizerError(str(e)) from e

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self._fields:
            if default is _REQUIRED:
                raise TokenizerError(f"{self.path}: GGUF metadata has no {key!r} field")
            return default
        return self._fields[key]


def _build_byte_level(meta: _GGUFMetadata, vocab: dict[str, int]) -> tuple[tokenizers.Tokenizer, bool]:
    """GPT-2-style byte-level BPE (`tokenizer.ggml.model == "gpt2"`), and whether to add BOS by default."""
    pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp also falls back to default
    if pre not in _BYTE_LEVEL_PRE:
        raise TokenizerError(f"{meta.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
                             f"(supported: {', '.join(_BYTE_LEVEL_PRE)})")
    spec = _BYTE_LEVEL_PRE[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    backend = tokenizers.Tokenizer(BPE(vocab, merges, ignore_merges=spec.ignore_merges))
    backend.normalizer = normalizers.NFC() if spec.nfc else None
    backend.pre_tokenizer = spec.pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend, spec.ignore_merges  # Llama 3 adds BOS by default (llama.cpp); the others do not


def _build_sentencepiece(meta: _GGUFMetadata, vocab: dict[str, int], tokens: list[str],
                         types: list[int]) -> tuple[tokenizers.Tokenizer, bool]:
    """SentencePiece BPE (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral), and whether to add BOS.

    Spaces are `▁`, unknown bytes become `<0xNN>` tokens. There are usually no merges in the file:
    SentencePiece merges the pair whose result has the best score, so we rank merges by that score.
    """
    if meta.get("tokenizer.ggml.merges", None) is not None:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    else:
        merges = _merges_from_scores(tokens, meta.get("tokenizer.ggml.scores"))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", None)
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    backend = tokenizers.Tokenizer(BPE(vocab, merges, unk_token=None if unk_id is None else tokens[unk_id],
                                       fuse_unk=True, byte_fallback=True))
    # The space prefix goes on every piece of text, including text right after a special token
    # ("<s>[INST]" -> "<s>", "▁[", ...) and text that already starts with a space. That is llama.cpp
    # and the original Llama 2 tokenizer.json (a Prepend normalizer); transformers' GGUF conversion
    # uses Metaspace(prepend_scheme="first") instead, which does neither.
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    replace = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if add_prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:  # take back the space the prefix added (Strip after Fuse: once per text, not per token)
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend, True  # SentencePiece models add BOS unless the file says otherwise


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    # Every split of a token into two vocabulary tokens is a merge, ranked by the merged token's
    # score (best first), then by the lengths of the left and the right piece (longest first), then
    # by the merged token's id: transformers' generate_merges order, so ids match it. (Its sort by
    # piece ids inside one token never decides: two splits of one token differ in the left length.)
    # Looking every split up in a dict takes seconds on a 262k vocabulary, so the pieces are numbered
    # with numpy instead: equal pieces get equal numbers, and a piece is in the vocabulary when its
    # number is that of a whole token.
    n = len(tokens)
    lengths = np.fromiter(map(len, tokens), np.int64, n)
    width = max(int(lengths.max(initial=0)), 1)
    codes = np.array(tokens, dtype=f"<U{width}").view(np.uint32).reshape(n, width)
    backwards = np.take_along_axis(codes, (lengths[:, None] - 1 - np.arange(width)).clip(0), axis=1)
    prefix, suffix = _piece_numbers(codes, lengths), _piece_numbers(backwards, lengths)
    # A piece's key: its length and number (numbers of one length are below n).
    rows = np.arange(n)
    whole_prefix, whole_suffix = lengths * n + prefix[rows, lengths], lengths * n + suffix[rows, lengths]
    splits = np.maximum(lengths[:len(scores)] - 1, 0)  # tokens without a score make no merges (zip)
    owner = np.repeat(np.arange(len(splits)), splits)
    left = np.arange(len(owner)) - np.repeat(np.cumsum(splits) - splits, splits) + 1
    right = lengths[owner] - left
    known = (np.isin(left * n + prefix[owner, left], whole_prefix)
             & np.isin(right * n + suffix[owner, right], whole_suffix))
    owner, left, right = owner[known], left[known], right[known]
    order = np.lexsort((owner, -right, -left, -np.asarray(scores, np.float64)[owner]))
    return [(tokens[t][:cut], tokens[t][cut:]) for t, cut in zip(owner[order].tolist(), left[order].tolist())]


def _piece_numbers(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[token, k] -> a number for the token's first k characters (k <= its length; codes: one row of
    code points per token), equal for equal strings of k characters and different otherwise: built a
    character at a time, numbering the distinct (number of the first k - 1, k-th character) pairs."""
    numbers = np.zeros((len(lengths), codes.shape[1] + 1), np.int32)
    base = int(codes.max(initial=0)) + 1
    for k in range(1, codes.shape[1] + 1):
        rows = np.flatnonzero(lengths >= k)
        pairs = numbers[rows, k - 1].astype(np.int64) * base + codes[rows, k - 1]
        numbers[rows, k] = np.unique(pairs, return_inverse=True)[1]
    return numbers


def _set_post_processor(backend: tokenizers.Tokenizer, bos: str | None, bos_id: int | None,
                        eos: str | None, eos_id: int | None) -> None:
    """Makes encode(add_special_tokens=True) add `bos` in front and/or `eos` at the end (None: don't)."""
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    special = ([(bos, bos_id)] if bos else []) + ([(eos, eos_id)] if eos and eos != bos else [])
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    # The environment transformers renders chat templates in: sandboxed (templates come from model
    # repositories), trim_blocks/lstrip_blocks, loop controls, and its helper functions.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON: {e}") from e


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens as "<s>" or as {"content": "<s>", ...}.
    return value.get("content") if isinstance(value, dict) else value


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
