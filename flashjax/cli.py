"""The `flashjax` command line: generate, chat.

Progress and streamed text go to stderr/stdout as a user expects; with
`--json`, the last line of stdout is one JSON object with the result.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="built-in name (smollm2), a Hugging Face model directory, or a .gguf file")
    p.add_argument("--max-context", type=int, default=None, help="cap the context length (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (float32 is fastest on XLA:CPU)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _sampling_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed)


def _load(args):
    from flashjax.api import LLM
    return LLM.load(args.model, compute_dtype=args.dtype, max_context=args.max_context)


def _emit(chunks, as_json: bool):
    """Streams text to stdout (or nothing, with --json); returns the final result."""
    result = None
    for chunk in chunks:
        if not as_json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.result is not None:
            result = chunk.result
    if not as_json:
        sys.stdout.write("\n")
    return result


def _report(result, as_json: bool) -> None:
    s = result.stats
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        rate = f"{s['tokens_per_s']:.1f} tok/s" if s.get("tokens_per_s") else "n/a"
        print(f"[{s['prompt_tokens']} prompt tokens, prefill {s['prefill_ms']:.0f} ms; "
              f"{s['generated_tokens']} generated, {rate}; stop: {result.finish_reason}]", file=sys.stderr)


def cmd_generate(args) -> int:
    llm = _load(args)
    result = _emit(llm.stream(args.prompt, **_sampling_options(args)), args.json)
    _report(result, args.json)
    return 0


def cmd_chat(args) -> int:
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        result = _emit(llm.stream_chat(messages, **_sampling_options(args)), args.json)
        _report(result, args.json)
        return 0
    # Interactive: keep the conversation; an empty line or EOF ends it.
    print("flashjax chat: type a message, an empty line to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        result = _emit(llm.stream_chat(messages, **_sampling_options(args)), False)
        messages.append({"role": "assistant", "content": result.text})
        _report(result, False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a continuation of a raw prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model (its chat template applied)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="one message, answered once (otherwise interactive)")
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        # Known failure modes (bad checkpoint, unsupported model, context too long) are one clear line.
        print(f"flashjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
