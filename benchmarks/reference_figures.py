"""Validation perplexity of the embedded reference model, dense and pruned.

``python -m benchmarks.reference_figures`` prints the table recorded in README.md: the
dense validation perplexity (window = the model's training length) and the figure after
one-shot pruning with each method at 50%, 70% and 2:4 (64 calibration windows, seed 0),
each pruned by the streamed engine (:func:`modules.engine.loop.prune_checkpoint`) into a
temporary folder and loaded back.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from modules.data.windows import calibration_windows, eval_windows
from modules.engine.loop import prune_checkpoint
from modules.engine.models import load_model
from modules.engine.request import PruneRequest
from modules.evaluation.perplexity import perplexity
from modules.pruning.sparsity import parse_spec

SETTINGS = ("0.5", "0.7", "2:4")


def main() -> None:
    """Print a markdown table of validation perplexity per method and setting."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="magnitude", help="comma-separated, e.g. magnitude,wanda")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        help="method option key=value for every method, e.g. precision=mixed",
    )
    args = ap.parse_args()
    if any("=" not in kv for kv in args.option):
        ap.error("--option: expected key=value")
    options = dict(kv.split("=", 1) for kv in args.option)
    model, tok = load_model("embedded")
    ctx = model.config.max_position_embeddings
    val = eval_windows("embedded-validation", tok, args.seqlen, max_context=ctx)
    calib = calibration_windows("embedded", tok, args.nsamples, args.seqlen, seed=0, max_context=ctx)
    dense = perplexity(model, val, batch_size=32, progress=False)["ppl"]
    rows = {"dense": {s: dense for s in SETTINGS}}
    for method in args.methods.split(","):
        if method == "gblm":
            raise SystemExit("gblm needs the gradient step: use `topiary prune` or the sweep")
        for setting in SETTINGS:
            spec = parse_spec(pattern=setting) if ":" in setting else parse_spec(float(setting))
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "pruned"
                prune_checkpoint(
                    "embedded", out, PruneRequest(method=method, spec=spec, options=options), calib
                )
                pruned, _ = load_model(str(out))
                ppl = perplexity(pruned, val, batch_size=32, progress=False)["ppl"]
            rows.setdefault(method, {})[setting] = ppl
    print(f"validation perplexity, window {args.seqlen}, {val.shape[0]} windows")
    print("| method | " + " | ".join(SETTINGS) + " |")
    print("| --- |" + " --- |" * len(SETTINGS))
    for name, figures in rows.items():
        print(f"| {name} | " + " | ".join(f"{figures[s]:.2f}" for s in SETTINGS) + " |")
    print(json.dumps({"dense": dense, **{k: v for k, v in rows.items() if k != "dense"}}))


if __name__ == "__main__":
    main()
