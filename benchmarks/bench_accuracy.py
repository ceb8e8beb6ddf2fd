"""What sparsity costs in accuracy: perplexity on held-out text, dense vs each sparse mode, with bytes read.

Calibrate first (on other text), then:

    python benchmarks/bench_accuracy.py MODEL_DIR --text EVAL.txt --max-tokens 512 [--json] [--out FILE]

Rows: dense; oracle with the calibrated thresholds (the true top neurons at the target sparsity,
with windowing: a measuring device, what a perfect predictor could do); the predictors at the
engine's default sigmoid threshold (FlashOptions.predictor_threshold), or at each threshold of
--predictor-thresholds for a sweep; the gate path. Every sparse row runs token by token through the
flash engine (teacher-forced), so its perplexity is what generation sees.

How much sparsity a model allows: `--gate-targets 0.3 0.5 0.7 --calibration-text FILE` calibrates the
gate path (training-free: thresholds only) at each target sparsity, in a scratch copy of the model
directory (links to its weights, its own predictors), and adds a gate-path and an oracle row for each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

from flashjax.bench.common import finish, log, machine, text_source


def default_threshold() -> float:
    """The engine's documented default, read from FlashOptions so this follows it when it moves."""
    from flashjax.flash.runner import FlashOptions

    return FlashOptions.predictor_threshold


def rows_to_run(thresholds: list[float] | None) -> list[tuple[str, dict]]:
    """(name, load options) per row; the predictors at the engine's default unless a sweep is asked for."""
    default = default_threshold()
    predictors = [(f"predictor, score > {t:g}" + (" (the engine's default)" if t == default else ""),
                   {"sparsity": "predictor", "predictor_threshold": t}) for t in (thresholds or [default])]
    return [("dense", {"sparsity": "dense"}),
            ("oracle, calibrated threshold + window 5 (measuring device)", {"sparsity": "oracle", "threshold": "calibrated"}),
            *predictors,
            ("gate path (gate resident)", {"sparsity": "gate"})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a converted and calibrated model directory")
    p.add_argument("--text", required=True, help="evaluation text the predictors never saw")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rows", nargs="*", default=None, help="subset of row names")
    p.add_argument("--predictor-thresholds", nargs="+", type=float, default=None, metavar="T",
                   help="predictor rows at these sigmoid thresholds, a sweep (default: the engine's default only)")
    p.add_argument("--memory-budget", default=None, help="budget for the sparse rows (default: unlimited)")
    p.add_argument("--gate-targets", nargs="+", type=float, default=None, metavar="S",
                   help="also the gate path and the oracle calibrated at each of these target sparsities")
    p.add_argument("--calibration-text", default=None, help="text --gate-targets calibrate on (not --text)")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import flashjax
    from flashjax.evaluate import perplexity
    from flashjax.sparsity import load_predictors

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if args.gate_targets and not args.calibration_text:
        p.error("--gate-targets needs --calibration-text (never the evaluation text)")
    pred = load_predictors(args.model)
    rows = []

    def measure(name, model_dir, options, **extra):
        log(f"{name}")
        budget = None if options["sparsity"] == "dense" else args.memory_budget
        llm = flashjax.load(model_dir, progress=False, memory_budget=budget, **options)
        # stride == context: every token is scored once, each window a fresh start.
        r = perplexity(llm, text, context=args.context, stride=args.context, max_tokens=args.max_tokens,
                       progress=True)
        row = {"config": name, "ppl": r["ppl"], "n_tokens": r["n_tokens"],
               "bytes_read_per_token": r.get("bytes_read_per_token", 0),
               "neurons_read_per_token": r.get("neurons_read_per_token", 0),
               "needed_neurons_per_token": (r.get("engine_stats") or {}).get("needed_neurons_per_token"), **extra}
        rows.append(row)
        log(f"  ppl {row['ppl']:.3f}, {row['bytes_read_per_token'] / 1e6:.2f} MB read/token")
        return llm

    for name, options in rows_to_run(args.predictor_thresholds):
        if not args.rows or name in args.rows:
            llm = measure(name, args.model, options)
    for target in args.gate_targets or []:
        with gate_calibrated_copy(args.model, args.calibration_text, target) as copy:
            measure(f"gate path, target sparsity {target:g}", copy, {"sparsity": "gate"}, target_sparsity=target)
            measure(f"oracle, target sparsity {target:g} (measuring device)", copy,
                    {"sparsity": "oracle", "threshold": "calibrated"}, target_sparsity=target)
    dense_ppl = rows[0]["ppl"] if rows and rows[0]["config"] == "dense" else None
    n_cells = llm.config.n_layers * llm.config.d_ffn
    print(f"| configuration | perplexity | vs dense | neurons used / token (of {n_cells}) | MB read / token |")
    print("|---|---|---|---|---|")
    for r in rows:
        rel = f"{100 * (r['ppl'] / dense_ppl - 1):+.1f}%" if dense_ppl else "-"
        used = "-" if r["needed_neurons_per_token"] is None else f"{r['needed_neurons_per_token']:.0f}"
        print(f"| {r['config']} | {r['ppl']:.3f} | {rel} | {used} | {r['bytes_read_per_token'] / 1e6:.2f} |")
    recall = None
    if pred is not None and pred.metrics.get("predictor"):
        recall = [m.get("recall") for m in pred.metrics["predictor"]]
        print("predictor recall per layer (held-out calibration tokens, score > 0.5): "
              + " ".join(f"{x:.2f}" for x in recall))
    report = {"benchmark": "accuracy", "machine": machine(), "model": args.model, "text": text_source(args.text),
              "calibration_text": text_source(args.calibration_text) if args.calibration_text else None,
              "default_predictor_threshold": default_threshold(),
              "context": args.context, "stride": args.context, "memory_budget": args.memory_budget, "max_tokens": args.max_tokens,
              "rows": rows, "predictor_recall_per_layer": recall,
              "target_sparsity": None if pred is None else pred.target_sparsity}
    return finish(report, args)


@contextlib.contextmanager
def gate_calibrated_copy(model_dir: str, calibration_text: str, target: float):
    """A scratch model directory linking to `model_dir`'s files, with its own gate-path thresholds
    calibrated at `target` sparsity (the original's predictors are left alone)."""
    from flashjax.sparsity import PREDICTORS_DIR, calibrate

    with open(calibration_text, encoding="utf-8") as f:
        calib = f.read()
    with tempfile.TemporaryDirectory(prefix="gate-target-") as tmp:
        for entry in os.listdir(model_dir):
            if entry != PREDICTORS_DIR:
                os.symlink(os.path.join(os.path.abspath(model_dir), entry), os.path.join(tmp, entry))
        log(f"calibrating the gate path at target sparsity {target:g}")
        calibrate(tmp, texts=[calib], kind="gate", target_sparsity=target, progress=False)
        yield tmp


if __name__ == "__main__":
    sys.exit(main())
