"""The `flashjax` command line: generate, chat.

Progress and streamed text go to stderr/stdout as a user expects; with
`--json`, the last line of stdout is one JSON object with the result.
"""

from __future__ import annotations

import argparse
import json
import sys

from flashjax import distributed

# This process's place among several (`--coordinator ...`), once joined; None when it runs alone.
_cluster: "distributed.Cluster | None" = None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="built-in name (smollm2, qwen2.5-coder-0.5b), a Hugging Face model directory or Hub id "
                        "(ORG/NAME, ORG/NAME:FILE.gguf, from the HF cache or downloaded), a .gguf file, "
                        "or a directory written by `flashjax convert`")
    p.add_argument("--max-context", type=int, default=None, help="cap the context length (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (float32 is fastest on XLA:CPU)")
    p.add_argument("--sparsity", default=None, choices=["dense", "naive", "hybrid", "oracle", "predictor", "gate"],
                   help="dense: all weights resident (default without a budget); naive: the whole FFN read "
                        "from disk per token; hybrid: naive plus a cache of what fits; oracle: the true active "
                        "neurons (a measuring device: its full computation is outside the budget and timings); "
                        "predictor: the calibrated low-rank predictors (default with a budget once calibrated); "
                        "gate: SwiGLU gate kept resident and thresholded (needs calibrate too). A mixture of "
                        "experts runs naive (its routed experts read every token), hybrid (the experts that "
                        "fit cached; the default with a budget), or predictor/gate (hybrid, with each streamed "
                        "expert read only at the neurons the rule selects; cached experts multiply whole)")
    p.add_argument("--selection", default="threshold", choices=["threshold", "topk"],
                   help="predictor/gate: threshold on the score, or each token's top-k")
    p.add_argument("--predictor-threshold", type=float, default=0.2,
                   help="sigmoid score a neuron must exceed (default measured on the default model: 0.2 costs "
                        "+0.3%% perplexity unbudgeted and +2.6%% at a 65%% budget; 0.5 costs +15%% and +59%%)")
    p.add_argument("--top-k-neurons", type=int, default=None,
                   help="top-k selection: k per layer (default: the calibrated mean active count)")
    p.add_argument("--over-select", type=float, default=1.0, help="top-k selection: multiply k by this")
    p.add_argument("--no-lookahead", action="store_true", help="predictor: do not read layer l+1 ahead")
    p.add_argument("--memory-budget", default=None,
                   help="memory the weights may take: bytes like 300MB or 2GiB, or a share of the dense model like 50%%")
    p.add_argument("--window", type=int, default=5, help="tokens whose neurons stay cached")
    p.add_argument("--prefetch-depth", type=int, default=2, help="layers whose reads may run ahead of the compute")
    p.add_argument("--concurrency", type=int, default=32, help="file reads in flight")
    p.add_argument("--scratch-rows", type=int, default=512,
                   help="neurons streamed per scratch chunk: those a layer needs beyond its cache go through the "
                        "FFN in chunks of this many (less memory, more dispatches)")
    p.add_argument("--evict-page-cache", action="store_true",
                   help="drop the model's files from the page cache before each token (cold reads)")
    p.add_argument("--devices", type=int, default=None,
                   help="split the model across this many devices (dense: FFN neurons, attention heads, vocabulary; "
                        "flash: each layer's FFN neurons, the budget then per device); default 1, or with several "
                        "processes every device of all of them")
    p.add_argument("--host-cache", default=None,
                   help="a host-RAM tier of neurons between the device caches and the disk: bytes like 4GB, "
                        "or a share of the on-disk FFN like 100%%")
    p.add_argument("--staging", default="auto", choices=["auto", "pinned", "direct"],
                   help="host memory read rows land in before the device copy (auto: pinned on accelerators)")
    p.add_argument("--resident-dtype", default="auto", choices=["auto", "compute", "storage"],
                   help="resident weights in the compute dtype or as stored (auto: as stored only when the "
                        "budget could not otherwise hold every neuron)")
    p.add_argument("--cache-dtype", default="auto", choices=["auto", "compute", "storage"],
                   help="cached neuron rows in the compute or the storage dtype (auto: likewise)")
    p.add_argument("--expert-policy", default="lfu", choices=["lru", "lfu"],
                   help="mixture of experts: which cached expert makes room for a routed one (least frequently "
                        "used over the last 64 tokens, the default, or least recently used)")
    p.add_argument("--verbose", action="store_true", help="print the memory plan")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _sampling_options(args) -> dict:
    """The generation options, checked here so that a bad one fails before any weight is read."""
    from flashjax.config import EngineConfig
    from flashjax.sampling import SamplingParams, check_max_tokens

    check_max_tokens(args.max_tokens)
    SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    EngineConfig(compute_dtype=args.dtype, max_context=args.max_context)
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed)


def _load(args, check_paths: bool = True):
    from flashjax.api import LLM

    devices = args.devices
    if _cluster is not None:
        if check_paths:
            # Every process needs the model at the same path: a path missing on one host names the host.
            _cluster.check_paths({"model": args.model})
        devices = _cluster.devices(devices)
    devices = 1 if devices is None else devices
    # --devices splits the dense engine too; the other options configure the flash engine only.
    flash = {"devices": devices}
    if args.sparsity not in (None, "dense") or args.memory_budget is not None or devices > 1:
        flash.update(window=args.window, prefetch_depth=args.prefetch_depth, concurrency=args.concurrency,
                     scratch_rows=args.scratch_rows,
                     evict_page_cache=args.evict_page_cache, selection=args.selection,
                     predictor_threshold=args.predictor_threshold, top_k=args.top_k_neurons,
                     over_select=args.over_select, lookahead=not args.no_lookahead,
                     host_cache=args.host_cache, staging=args.staging, resident_dtype=args.resident_dtype,
                     cache_dtype=args.cache_dtype, expert_policy=args.expert_policy)
    quiet = _cluster is not None and not _cluster.leader  # progress bars and the plan: process 0's
    llm = LLM.load(args.model, compute_dtype=args.dtype, max_context=args.max_context, sparsity=args.sparsity,
                   memory_budget=args.memory_budget, verbose=args.verbose and not quiet, progress=not quiet, **flash)
    if _cluster is not None:
        distributed.track_reads(llm.runner)  # each process's reads, for its line in "processes"
    return llm


def _processes(llm):
    """With several processes: every process's share (host, devices, what it read) on process 0, None
    on the others; [] when running alone."""
    if _cluster is None:
        return []
    return _cluster.gather("report", _cluster.report(llm))


def cmd_calibrate(args) -> int:
    from flashjax.sparsity import calibrate

    texts = None
    if args.text:
        texts = []
        for path in args.text:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    pred = calibrate(args.model, texts=texts, tokens=args.tokens, rank=args.rank, rank_last=args.rank_last,
                     target_sparsity=args.target_sparsity, seq_len=args.seq_len, epochs=args.epochs,
                     kind=args.kind, lookahead=not args.no_lookahead)
    summary = {"model": args.model, "kind": pred.kind, "ranks": list(pred.ranks),
               "target_sparsity": pred.target_sparsity, "metrics": pred.metrics, "info": pred.info}
    if args.json:
        print(json.dumps(summary, default=float))
    return 0


def cmd_convert(args) -> int:
    from flashjax.store import convert

    manifest = convert(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       bundle=not args.no_bundle, quant=args.quant)
    summary = {"out": args.out, "dtype": manifest.dtype, "layers": len(manifest.layers),
               "layout": manifest.layout.to_json(), "quantization": manifest.source.get("quantization")}
    print(json.dumps(summary) if args.json else f"converted {args.source} -> {args.out}")
    return 0


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
    options = _sampling_options(args)
    llm = _load(args)
    result = _emit(llm.stream(args.prompt, **options), args.json)
    processes = _processes(llm)
    if processes is None:
        return 0  # process 0 reports
    if processes:
        result.stats["processes"] = processes
    _report(result, args.json)
    return 0


def cmd_chat(args) -> int:
    options = _sampling_options(args)
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        result = _emit(llm.stream_chat(messages, **options), args.json)
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
        result = _emit(llm.stream_chat(messages, **options), False)
        messages.append({"role": "assistant", "content": result.text})
        _report(result, False)
    return 0


# ---- eval: perplexity and multiple choice (flashjax.evaluate) ----------------------------------------

def _eval_report(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))


def _engine_line(r: dict) -> str:
    line = f"engine: {r['engine']} ({r['method']}), {r['seconds']:.1f} s"
    if r.get("bytes_read_per_token") is not None:
        line += f"; {r['bytes_read_per_token'] / 1e6:.3f} MB read per token"
        if r.get("cache_hit_rate") is not None:
            line += f", cache hit rate {r['cache_hit_rate']:.3f}"
    return line


def cmd_eval_ppl(args) -> int:
    from flashjax.evaluate import check_perplexity_arguments, perplexity

    check_perplexity_arguments(args.context, args.stride, args.max_tokens)
    if _cluster is not None:
        _cluster.check_paths({"text": args.text}, required=("text",))
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    llm = _load(args)
    r = perplexity(llm, text, context=args.context, stride=args.stride, max_tokens=args.max_tokens,
                   progress=_cluster is None or _cluster.leader)
    processes = _processes(llm)
    if processes is None:
        return 0
    if processes:
        r["processes"] = processes
    _eval_report(r, args.json, [
        f"perplexity {r['ppl']:.4f} (nll {r['nll']:.4f} nats/token) over {r['n_tokens']} tokens of {args.text}",
        f"context {r['context']}, stride {r['stride']}, {r['windows']} windows",
        _engine_line(r)])
    return 0


def cmd_eval_choice(args) -> int:
    from flashjax.evaluate import load_tasks, multiple_choice

    if _cluster is not None:
        _cluster.check_paths({"tasks": args.tasks}, required=("tasks",))
    tasks = load_tasks(args.tasks, limit=args.limit)
    llm = _load(args)
    r = multiple_choice(llm, tasks, normalize=args.normalize, progress=_cluster is None or _cluster.leader)
    processes = _processes(llm)
    if processes is None:
        return 0
    if processes:
        r["processes"] = processes
    _eval_report(r, args.json, [
        f"accuracy {r['accuracy']:.4f} ({r['correct']}/{r['n']}), "
        f"length-normalized {r['accuracy_norm']:.4f} ({r['correct_norm']}/{r['n']}) on {args.tasks}",
        _engine_line(r)])
    return 0


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure the model: perplexity over a text, multiple-choice accuracy")
    evals = p.add_subparsers(dest="eval_command", required=True)

    q = evals.add_parser("ppl", help="sliding-window perplexity over a text file")
    _add_model_args(q)
    q.add_argument("--text", required=True, help="a UTF-8 text file")
    q.add_argument("--context", type=int, default=512, help="tokens per window")
    q.add_argument("--stride", type=int, default=256,
                   help="tokens between window starts; each window after the first scores its last STRIDE tokens")
    q.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    distributed.add_arguments(q)
    q.set_defaults(func=cmd_eval_ppl)

    q = evals.add_parser("choice", help="multiple-choice accuracy by log-likelihood of each option")
    _add_model_args(q)
    q.add_argument("--tasks", required=True,
                   help='JSONL file, one {"question": ..., "options": [...], "answer": index or text} a line')
    q.add_argument("--limit", type=int, default=None, help="score only the first N tasks")
    q.add_argument("--normalize", default="none", choices=["none", "length"],
                   help="which rule each item's prediction follows (both accuracies are reported)")
    q.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    distributed.add_arguments(q)
    q.set_defaults(func=cmd_eval_choice)


def cmd_bench(args) -> int:
    """The comparison benchmark (flashjax.bench.compare); every option is the runner's."""
    from flashjax.bench.compare import main as bench_main

    return bench_main(args.bench_args)


def cmd_serve(args) -> int:
    """An OpenAI-compatible server (flashjax.server); the model is loaded once, in the background."""
    import os

    from flashjax.config import EngineConfig
    from flashjax.server import ServerConfig, serve

    # Checked before anything binds or loads: a bad option is one clear line, not a server that dies.
    EngineConfig(compute_dtype=args.dtype, max_context=args.max_context)
    if _cluster is not None:
        # Here, on every process (process 0 loads on the server's engine thread, after binding).
        _cluster.check_paths({"model": args.model})
        if not _cluster.leader:
            # Process 0 listens; the others take every request's steps with it.
            return _cluster.follow(_load(args, check_paths=False))
    config = ServerConfig(model_name=args.model, host=args.host, port=args.port,
                          api_key=args.api_key or os.environ.get("FLASHJAX_API_KEY") or None,
                          queue_limit=args.queue_limit, max_body_bytes=args.max_body_bytes,
                          default_max_tokens=args.default_max_tokens, shutdown_timeout_s=args.shutdown_timeout,
                          warm_up=not args.no_warm_up, log_level=args.log_level)
    if _cluster is not None:
        return serve(lambda: _cluster.lead(_load(args, check_paths=False)), config)
    return serve(lambda: _load(args), config)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming, "
                                     "metrics, a chat page at /)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port, logged)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every endpoint but /health and the page "
                        "(default: $FLASHJAX_API_KEY, else none)")
    p.add_argument("--queue-limit", type=int, default=64,
                   help="requests that may wait for the engine; past it the server answers 503 with Retry-After")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (413 past it)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="tokens generated for a request that sets no max_tokens (within the context left)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds a running request may take to finish after Ctrl-C or SIGTERM, before it is cancelled")
    p.add_argument("--no-warm-up", action="store_true",
                   help="skip compiling the common shapes before /health reports ready")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a continuation of a raw prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="write a model in the flash format (FFN on disk, the rest resident)")
    p.add_argument("source", help="anything --model accepts")
    p.add_argument("out", help="new model directory")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the weights on disk")
    p.add_argument("--quant", choices=["q8", "q4"], default=None,
                   help="store the weights quantized instead, in blocks of 32 with float16 scales: q8 (8.5 bits "
                        "per weight, like ggml's Q8_0) or q4 (5 bits, like Q4_1); a GGUF's matching blocks are "
                        "copied as they are, and the error against the source is reported")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at OUT")
    p.add_argument("--no-bundle", action="store_true",
                   help="store gate/up/down as separate arrays (the benchmark's bundling-off baseline)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("calibrate", help="train the sparsity predictors of a converted model and store them with it")
    p.add_argument("model", help="a directory written by `flashjax convert`")
    p.add_argument("--text", nargs="*", default=None,
                   help="calibration text files (default: text the model writes itself from built-in prompts)")
    p.add_argument("--tokens", type=int, default=8192, help="token positions collected")
    p.add_argument("--rank", type=int, default=None, help="predictor rank (default: proportional to d_model)")
    p.add_argument("--rank-last", type=int, default=None, help="rank of the last 4 layers (denser)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="share of neurons counted inactive (SwiGLU default 0.5; ReLU: exact zeros)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--kind", default="lowrank", choices=["lowrank", "gate"],
                   help="lowrank: train predictors; gate: only the SwiGLU gate thresholds (training-free)")
    p.add_argument("--no-lookahead", action="store_true", help="skip the lookahead predictors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("chat", help="chat with the model (its chat template applied)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", default=None, help="one message, answered once (otherwise interactive)")
    p.add_argument("--system", default=None, help="a system message")
    p.set_defaults(func=cmd_chat)

    # Every option goes to flashjax.bench.compare (prefix "+": "--quick" etc. are not this parser's).
    p = sub.add_parser("bench", add_help=False, prefix_chars="+",
                       help="flashjax beside transformers, accelerate and llama.cpp (see `flashjax bench --help`)")
    p.add_argument("bench_args", nargs="*")
    p.set_defaults(func=cmd_bench)

    _add_eval_parser(sub)
    _add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    global _cluster
    args = build_parser().parse_args(argv)
    try:
        settings = distributed.settings_from(args)
        if settings is not None and not distributed.is_worker():
            # Several processes: this one watches the engine process and names a lost peer.
            return distributed.supervise(list(sys.argv[1:] if argv is None else argv), settings)
        if settings is not None:
            _cluster = distributed.start(settings)  # before anything touches a device
    except (ValueError, RuntimeError, OSError) as e:
        print(f"flashjax: error: {e}", file=sys.stderr)
        return 2
    rc, error = 2, None
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        rc = 130
    except (ValueError, RuntimeError, OSError) as e:
        # Known failure modes (bad checkpoint, unsupported model, context too long) are one clear line.
        print(f"flashjax: error: {e}", file=sys.stderr)
        error = e
    except BaseException as e:
        if _cluster is None:
            raise
        import traceback
        traceback.print_exc()
        error = e
    finally:
        if _cluster is not None:
            _cluster.finish(rc == 0 and error is None, error, rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
