"""Can the embedded zero-shot suite tell dense, Wanda 50% and magnitude 70% apart?

``python -m benchmarks.zeroshot_intervals`` prunes the embedded reference model with
Wanda at 50% and magnitude at 70% (64 calibration windows of 128 tokens, seed 0, as the
pipeline; the streamed engine, :func:`modules.engine.loop.prune_checkpoint`), runs the
embedded suite on the three models through lm-eval (the pipeline's
code, per-item results on) and prints, per model: the zero-shot wall time, the mean
accuracy with its own 95% bootstrap interval, and the paired difference from dense
(points, 95% interval) per task and for the mean. The last line is the same as JSON.

``--scorer direct`` scores the same requests without lm-eval (one padded forward per
batch, lm-eval's context/continuation split and argmax of summed log-likelihoods, which
``tests/evaluation/test_zeroshot.py`` checks item by item against lm-eval); it gives the same
per-item answers several times faster, for a machine too busy for three lm-eval runs.
Time the pipeline's zero-shot itself with ``time topiary eval zeroshot embedded``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from modules.data.windows import calibration_windows
from modules.engine.loop import prune_checkpoint
from modules.engine.models import load_model
from modules.engine.request import PruneRequest
from modules.evaluation.intervals import accuracy_interval, paired_accuracy
from modules.evaluation.suite import item_requests
from modules.evaluation.zeroshot import EMBEDDED_TASKS, SUITE_DIR, zeroshot
from modules.pruning.sparsity import parse_spec

MODELS = (("wanda 50%", "wanda", 0.5), ("magnitude 70%", "magnitude", 0.7))


def _encode(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces go to the continuation; empty context -> EOS."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tok.eos_token_id], tok(continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, tok(context + continuation)["input_ids"][len(ctx) :]


@torch.no_grad()
def direct_items(model, tok, batch_size: int = 64) -> dict[str, list[int]]:
    """Each item's correctness without lm-eval: argmax of summed log-likelihoods == label,
    or for ``topiary_greedy`` lm-eval's is_greedy (every argmax token is the word's)."""
    out = {}
    for name in EMBEDDED_TASKS:
        rows = [json.loads(line) for line in (SUITE_DIR / f"{name}.jsonl").read_text().splitlines()]
        reqs = [_encode(tok, c, x) for row in rows for c, x in item_requests(name, row)]
        scores, greedy = [0.0] * len(reqs), [False] * len(reqs)
        for start in range(0, len(reqs), batch_size):
            chunk = reqs[start : start + batch_size]
            seqs = [(c + x)[:-1] for c, x in chunk]
            ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
            for j, seq in enumerate(seqs):
                ids[j, : len(seq)] = torch.tensor(seq)
            logp = model(input_ids=ids).logits.log_softmax(-1)
            for j, (c, x) in enumerate(chunk):
                end = len(c) + len(x) - 1
                picked = logp[j, end - len(x) : end].gather(-1, torch.tensor(x)[:, None])
                scores[start + j] = picked.sum().item()
                greedy[start + j] = logp[j, end - len(x) : end].argmax(-1).tolist() == x
        if name == "topiary_greedy":
            out[name] = [int(g) for g in greedy]
            continue
        out[name] = []
        for i, row in enumerate(rows):
            mine = scores[4 * i : 4 * i + 4]
            out[name].append(int(mine.index(max(mine)) == row["label"]))
    return out


def main() -> None:
    """Print the table described in the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--scorer", choices=("lm-eval", "direct"), default="lm-eval")
    args = ap.parse_args()
    dense, tok = load_model("embedded", device="cpu")
    ctx = dense.config.max_position_embeddings
    calib = calibration_windows("embedded", tok, 64, 128, seed=0, max_context=ctx)
    models = {"dense": dense}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, sparsity in MODELS:
            out = Path(tmp) / method
            prune_checkpoint("embedded", out, PruneRequest(method=method, spec=parse_spec(sparsity)), calib)
            models[label] = load_model(str(out), device="cpu")[0]
    results, seconds = {}, {}
    for label, model in models.items():
        start = time.perf_counter()
        if args.scorer == "direct":
            results[label] = {"items": {"acc": direct_items(model.eval(), tok)}}
        else:
            results[label] = zeroshot(
                model, tok, ["embedded"], limit=args.limit, batch_size=args.batch_size, per_item=True
            )
        seconds[label] = time.perf_counter() - start
    base = results["dense"]["items"]["acc"]
    print(f"embedded suite ({args.scorer}), items per task: { {k: len(v) for k, v in base.items()} }")
    print("| model | scoring s | mean acc (95% CI) | " + " | ".join(base) + " | mean diff (95% CI) |")
    print("| --- | ---: | ---: |" + " ---: |" * (len(base) + 1))
    summary = {}
    for label, result in results.items():
        own = accuracy_interval(result["items"]["acc"])
        acc, lo, hi = own["acc"], own["lo"], own["hi"]
        paired = paired_accuracy(base, result["items"]["acc"])
        cells = [f"{t['diff']:+.2f} [{t['lo']:+.2f}, {t['hi']:+.2f}]" for t in paired["tasks"].values()]
        m = paired["mean"]
        print(
            f"| {label} | {seconds[label]:.1f} | {acc:.2f} [{lo:.2f}, {hi:.2f}] | "
            + " | ".join(cells)
            + f" | {m['diff']:+.2f} [{m['lo']:+.2f}, {m['hi']:+.2f}] |"
        )
        summary[label] = {"seconds": seconds[label], "acc": [acc, lo, hi], "paired": paired}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
