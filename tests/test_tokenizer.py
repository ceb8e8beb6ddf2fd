"""flashjax.tokenizer against transformers, the reference.

The default model's GGUF comes from FLASHJAX_DEFAULT_GGUF or flashjax.hub; tests that need it are
skipped without it, except under CI (CI=true), where its absence fails them. The other tests build
small tokenizers and GGUF files of their own.
"""

import copy
import dataclasses
import json
import os
import pathlib

import gguf
import pytest
import transformers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from _ci import skip_or_fail
from flashjax.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    # code: indentation, tabs, runs of spaces and newlines, trailing whitespace
    "def f(x):\n    if x:\n\treturn x * y\n\n\n# done   \n",
    "class A:\n\tdef __init__(self):\n\t\tself.items = []  # list\n    \n",
    "  leading and trailing spaces  ",
    "\r\n\r\nwindows line endings\r\n",
    "don't I'll we've THEY'RE it's",
    # unicode: accents, CJK, emoji (incl. skin tone and ZWJ sequences)
    "Café naïve résumé — “quotes” … Ærøskøbing",
    "日本語のテキストと中文文本，한국어도",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 🇫🇷",
    # numbers (single spaces before digits: see test_digits_split_like_the_original)
    "numbers 12345 3.14159 1,000,000 -42 0x1F 2024-06-01 $19.99 100%",
    # special tokens written in the text
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "",
]

MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke 😀"}],
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    # An explicit path wins; otherwise ask flashjax.hub (which may download the default model).
    if os.environ.get("FLASHJAX_DEFAULT_GGUF"):
        path = pathlib.Path(os.environ["FLASHJAX_DEFAULT_GGUF"])
        if not path.is_file():
            skip_or_fail(f"FLASHJAX_DEFAULT_GGUF={path} does not exist")
        return path
    try:
        from flashjax.hub import default_model_path
        return pathlib.Path(default_model_path())
    except Exception as e:  # not written yet, offline, ...
        skip_or_fail(f"default GGUF unavailable (set FLASHJAX_DEFAULT_GGUF): {e}")


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ref(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# -- the default model (SmolLM2) -------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_reference(ours, ref, text):
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(ours, ref, text):
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_digits_split_like_the_original(ours, ref):
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every digit off before
    # the GPT-2 regex; transformers' GGUF conversion does not. They differ only on whitespace runs
    # right before a digit: we follow the original.
    original = copy.deepcopy(ref.backend_tokenizer)
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokens = lambda text: [ours.backend.id_to_token(i) for i in ours.encode(text)]  # noqa: E731
    assert tokens("a  1") == ["a", "ĠĠ", "1"]  # transformers: a, Ġ, Ġ, 1
    assert tokens("x = [\n    1,\n\t\t2]") == ["x", "Ġ=", "Ġ[", "ĊĠĠĠĠ", "1", ",", "Ċĉĉ", "2", "]"]
    for text in ["a  1", "\n\n1", "x =  42", "foo(\n    1,\n    2)", "tab\t\t5", "12345", "In 2024, pi=3.14"]:
        assert ours.encode(text) == original.encode(text).ids
        assert ours.decode(ours.encode(text)) == text


def test_metadata(ours, ref):
    assert ours.vocab_size == len(ref) == 49152
    assert ours.bos_token_id == ref.bos_token_id == 1  # <|im_start|>; not added: add_bos_token is false
    assert ours.eos_token_ids == (2, 0)  # <|im_end|> (the eos), then <|endoftext|> as llama.cpp
    assert ours.eos_token_ids[0] == ref.eos_token_id
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_reference(ours, ref, messages, add_generation_prompt):
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_missing(ours):
    with pytest.raises(TokenizerError, match="no chat template"):
        dataclasses.replace(ours, chat_template=None).apply_chat_template(MESSAGES[0])


def test_chat_template_raise_exception(ours):
    tok = dataclasses.replace(ours, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tok.apply_chat_template(MESSAGES[0])


def stream(tokenizer, ids, **options) -> list[str]:
    decoder = StreamDecoder(tokenizer, **options)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder(ours, text):
    ids = ours.encode(text)
    pieces = stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    skipped = stream(ours, ids, skip_special_tokens=True)
    assert "".join(skipped) == ours.decode(ids, skip_special_tokens=True)


def test_stream_decoder_holds_back_split_emoji(ours):
    ids = ours.encode("ok 🎉!")  # ok, " " + first emoji bytes, byte, last byte, !
    assert [ours.decode([i]) for i in ids] == ["ok", " \ufffd", "\ufffd", "\ufffd", "!"]
    assert stream(ours, ids) == ["ok", "", "", " 🎉", "!", ""]


def test_stream_decoder_flushes_incomplete_text(ours):
    ids = ours.encode("🎉")[:1]  # the first bytes of a character, never completed
    pieces = stream(ours, ids)
    assert pieces[0] == "" and "".join(pieces) == ours.decode(ids)


# -- other GGUF tokenizers, on small files we write -------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "In 2024 the price rose from 1234 to 5678.90 (up 12.5%).",
    "def main():\n    for i in range(10):\n        print(i)\n",
    "Café naïve résumé; 日本語のテキスト and emoji 🎉.",
    "She's here, they're there, we'll see. I've 3 cats and 42 dogs.",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMALL_TEXTS = [
    "Hello world, the lazy fox!", "In 1999 I paid 123456 for 7.5 kg.", "def f():\n    return  1\n\n",
    "Café 日本 🎉 naïve", "they're we'll I've", "<|im_start|>user\nhi<|im_end|>", "  x\r\n\r\n  y", "",
]


def write_gguf(path, **fields):
    """A GGUF file holding only metadata: tokenizer.ggml.<key> for each keyword argument."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        key = key if key.startswith("tokenizer.") else f"tokenizer.ggml.{key}"
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:  # a list: the element type comes from its first item
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def byte_level_vocab():
    """A small trained byte-level BPE: (tokens, merges), specials first."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    return tokens, [" ".join(m) for m in model["merges"]]


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe", "smollm"])
def test_byte_level_pre_tokenizers_match_reference(tmp_path, byte_level_vocab, pre):
    tokens, merges = byte_level_vocab
    tokens = tokens + ["<think>"]  # user-defined (type 4): matched whole, but not special
    path = write_gguf(tmp_path / "bpe.gguf", model="gpt2", pre=pre, tokens=tokens, merges=merges,
                      token_type=[3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4],
                      bos_token_id=1, eos_token_id=2, add_bos_token=False)
    ours = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    if pre == "smollm":  # transformers has no "smollm": use the original SmolLM2 pipeline (see above)
        ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in SMALL_TEXTS + ["<think>hmm, 42</think>"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<think>")[0] == len(tokens) - 1
    assert ours.decode(ours.encode("<|im_start|><think>"), skip_special_tokens=True) == "<think>"
    assert ours.eos_token_ids == (2, 0)  # eos, then <|endoftext|> by name


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A small SentencePiece-style (Llama 2) GGUF: scores but no merges, <0xNN> byte tokens."""
    tok = RustTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=250, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merged = list(dict.fromkeys(a + b for a, b in model["merges"]))
    chars = [t for t in model["vocab"] if t not in set(merged)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + merged
    # SentencePiece merges the pair whose result scores best: score merged tokens by merge order.
    scores = [0.0] * 259 + [-1e6] * len(chars) + [-float(i) for i in range(len(merged))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(merged))
    directory = tmp_path_factory.mktemp("spm")
    return write_gguf(directory / "spm.gguf", model="llama", tokens=tokens, scores=scores, token_type=types,
                      bos_token_id=1, eos_token_id=2, unknown_token_id=0)


def test_sentencepiece_matches_reference(spm_gguf):
    ours = Tokenizer.from_gguf(spm_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    for text in ["Hello world", "The lazy fox, the quick dog!", "héllo 🎉 naïve", "multi  spaces\nnewline", ""]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == 1  # SentencePiece GGUFs add BOS unless they say otherwise
        assert ours.decode(ids, skip_special_tokens=True) == text
        assert ours.decode(ids) == ref.decode(ids)
        assert "".join(stream(ours, ids)) == ours.decode(ids)
    assert ours.encode("Hello", add_special_tokens=False)[0] != 1


def test_sentencepiece_space_prefix_like_llama_cpp(spm_gguf):
    # The "▁" prefix also goes after special tokens and onto text that starts with a space, as in
    # llama.cpp and the original Llama 2 tokenizer.json (transformers' GGUF conversion does neither).
    ours = Tokenizer.from_gguf(spm_gguf)
    tokens = lambda text: [ours.backend.id_to_token(i) for i in ours.encode(text)]  # noqa: E731
    assert tokens("hi</s>the") == ["<s>", "▁", "h", "i", "</s>", "▁the"]
    assert tokens(" the") == ["<s>", "▁", "▁the"]


# -- Hugging Face directories ------------------------------------------------------------------------

def test_hf_dir_matches_reference(tmp_path):
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False, "special": True},
        "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    ours = Tokenizer.from_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, (2, 0), len(ref))
    assert ours.encode("hi")[0] == 1 and ours.encode("hi", add_special_tokens=False)[0] != 1
    for text in SMALL_TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    for messages in MESSAGES:
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# -- errors ----------------------------------------------------------------------------------------

def test_missing_gguf_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(TokenizerError, match="not found") as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file")
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        Tokenizer.from_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", model="bert", tokens=["[PAD]", "a"])
    with pytest.raises(TokenizerError, match="'bert' is not supported") as info:
        Tokenizer.from_gguf(path)
    assert "gpt2" in str(info.value) and "llama" in str(info.value) and str(path) in str(info.value)


def test_unsupported_pre_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "pre.gguf", model="gpt2", pre="mystery", tokens=["a", "b"], merges=["a b"])
    with pytest.raises(TokenizerError, match="'mystery'") as info:
        Tokenizer.from_gguf(path)
    assert "smollm" in str(info.value) and "qwen2" in str(info.value)


@pytest.mark.parametrize("fields, missing", [
    ({}, "tokenizer.ggml.model"),
    ({"model": "gpt2"}, "tokenizer.ggml.tokens"),
    ({"model": "gpt2", "tokens": ["a", "b"]}, "tokenizer.ggml.merges"),
    ({"model": "llama", "tokens": ["a", "b"]}, "tokenizer.ggml.scores"),
])
def test_missing_metadata(tmp_path, fields, missing):
    path = write_gguf(tmp_path / "partial.gguf", **fields)
    with pytest.raises(TokenizerError, match=missing) as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value)
