"""What neuron sparsity inside a mixture of experts' routed experts costs: each mode against dense.

    python benchmarks/moe_synthetic.py --out /tmp/moe-small --scale tiny      # or any converted MoE
    flashjax calibrate /tmp/moe-small/flash --text CALIB.txt
    python benchmarks/bench_moe_sparsity.py /tmp/moe-small/flash --text HELD_OUT.txt --json

Every row runs at its mode's minimum budget (no expert slot: every routed expert streams, so the
predictor or gate path cuts every one of them to its selected neurons, the option's full cost),
teacher-forced token by token through the flash engine over windows of the held-out text, and is
compared position by position with the dense engine on the same windows: the share of positions
whose most likely next token agrees, the mean KL(dense || row) of the next-token distributions,
the perplexity of the text, the share of the routed experts' neurons selected, and the bytes read
per token. `naive` (every routed expert whole) shows what the flash path alone changes (nothing but
rounding). The last line with --json is one JSON object.
"""

from __future__ import annotations

import argparse

import numpy as np

from flashjax.bench.common import finish, log, machine, text_source


def minimum_budget(model_dir: str, **options) -> int:
    """The smallest budget a mode runs in: resident weights (predictors or gate rows included),
    scratch and read buffers, no expert slot."""
    import flashjax
    from flashjax.flash.budget import BudgetTooSmallError

    try:
        flashjax.load(model_dir, progress=False, memory_budget=1, **options)
    except BudgetTooSmallError as e:
        return e.minimum_bytes
    raise AssertionError("a budget of one byte was accepted")


def stepwise_log_probs(llm, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Log-softmax [len(ids) - prompt, V] of the next-token logits after ids[:prompt], then after each
    teacher-forced decode step (the last token is not decoded: nothing follows it to score)."""
    import jax

    from flashjax.sampling import SamplingParams

    runner, sampling, key = llm.runner, SamplingParams(), jax.random.PRNGKey(0)
    runner.start(len(ids) + 1)
    runner.warm_up(sampling, key)
    _, logits = runner.prefill(ids[:prompt], sampling, key)
    out = [np.asarray(logits[0], np.float64)]
    for pos in range(prompt, len(ids) - 1):
        _, logits = runner.decode(np.array([ids[pos]], np.int32), pos, sampling, key)
        out.append(np.asarray(logits[0], np.float64))
    rows = np.stack(out)
    rows -= rows.max(-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(-1, keepdims=True))


def compare(reference: list[np.ndarray], ours: list[np.ndarray], windows: list[np.ndarray], prompt: int) -> dict:
    """Top-1 agreement, mean KL(reference || ours) and perplexity of the true next tokens."""
    ref, got = np.concatenate(reference), np.concatenate(ours)
    targets = np.concatenate([w[prompt:] for w in windows])
    kl = (np.exp(ref) * (ref - got)).sum(-1)
    nll = -got[np.arange(len(targets)), targets]
    return {"positions": len(targets), "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "ppl": float(np.exp(nll.mean()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a converted mixture of experts, calibrated (flashjax calibrate)")
    p.add_argument("--text", required=True, help="held-out text the predictors never saw")
    p.add_argument("--windows", type=int, default=4, help="windows spread over the text")
    p.add_argument("--window", type=int, default=128, help="tokens per window")
    p.add_argument("--prompt", type=int, default=16, help="tokens prefilled before the scored steps")
    p.add_argument("--predictor-thresholds", nargs="+", type=float, default=[0.2, 0.5], metavar="T")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.prompt < args.window - 1:
        p.error("--prompt must leave tokens to score in each window")

    import flashjax

    dense = flashjax.load(args.model, progress=False, sparsity="dense")
    if not dense.config.is_moe:
        p.error(f"{args.model} is not a mixture of experts")
    with open(args.text, encoding="utf-8") as f:
        ids = np.asarray(dense.tokenizer.encode(f.read()), np.int32)
    if len(ids) < args.window:
        p.error(f"{args.text} has {len(ids)} tokens, fewer than one window of {args.window}")
    starts = np.linspace(0, len(ids) - args.window, args.windows).astype(int)
    windows = [ids[s:s + args.window] for s in starts]
    log("dense")
    reference = [stepwise_log_probs(dense, w, args.prompt) for w in windows]
    modes = [("naive", {"sparsity": "naive"})]
    modes += [(f"predictor, score > {t:g}", {"sparsity": "predictor", "predictor_threshold": t})
              for t in args.predictor_thresholds]
    modes += [("gate path (calibrated thresholds)", {"sparsity": "gate"})]
    rows = [dict(config="dense", **compare(reference, reference, windows, args.prompt))]
    for name, options in modes:
        budget = minimum_budget(args.model, **options)
        log(f"{name} at its minimum budget ({budget} bytes)")
        llm = flashjax.load(args.model, progress=False, memory_budget=budget, **options)
        ours, shares, read = [], [], []
        for w in windows:
            ours.append(stepwise_log_probs(llm, w, args.prompt))
            stats = llm.runner.stats()
            shares.append(stats.get("expert_neurons_selected_share"))
            read.append(stats["bytes_read_per_token"])
        llm.runner.close()
        row = dict(config=name, memory_budget=budget, **compare(reference, ours, windows, args.prompt),
                   expert_neurons_selected_share=None if shares[0] is None else float(np.mean(shares)),
                   bytes_read_per_token=float(np.mean(read)))
        rows.append(row)
        log(f"  top-1 agreement {row['top1_agreement']:.3f}, KL {row['mean_kl']:.4f}, ppl {row['ppl']:.2f}, "
            f"{row['bytes_read_per_token'] / 1e6:.3f} MB read/token")
    print("| configuration | top-1 agreement with dense | mean KL | perplexity | neurons selected | MB read / token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = r.get("expert_neurons_selected_share")
        print(f"| {r['config']} | {r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | {r['ppl']:.2f} | "
              f"{'-' if share is None else f'{share:.3f}'} | {r.get('bytes_read_per_token', 0) / 1e6:.3f} |")
    report = {"benchmark": "moe_sparsity", "machine": machine(), "model": args.model, "text": text_source(args.text),
              "windows": args.windows, "window": args.window, "prompt": args.prompt, "rows": rows}
    return finish(report, args)


if __name__ == "__main__":
    raise SystemExit(main())
