"""Parity with the public reference code: the references' own functions against Topiary.

``python -m benchmarks.parity --wanda DIR --sparsegpt DIR --admm DIR --gblm DIR`` (or
``make parity WANDA_DIR=... SPARSEGPT_DIR=... ADMM_DIR=... GBLM_DIR=...``) prunes the
embedded model with each method at each setting, once with Topiary's in-memory prune
(tests/engine/oracle.py) and once with the reference repository's own pruning function,
on the same calibration windows,
for several calibration seeds, and prints per method and setting: mask agreement,
validation perplexity ours / reference (mean and spread of the relative difference over
seeds), per-block reconstruction error of both, and the time ratio (same process,
same thread count). Topiary runs every method with its defaults; ``--option key=value``
changes one for Topiary's side (e.g. ``group=matrix``, ADMM-Grad's reference group).

The reference code is never copied: it is imported at run time from the local clones
given (https://github.com/locuslab/wanda, IST-DASLab/sparsegpt, fmfi-compbio/admm-pruning,
RocktimJyotiDas/GBLM-Pruner). A method whose clone is not given is skipped with a line
saying so. To drive that code offline on today's transformers, only its surroundings
are adapted, at run time:

- its data loader (``get_loaders``, which would download C4) is replaced in the imported
  module by one returning our calibration windows (as ``(input, target)`` pairs);
- the decoder layers are wrapped so that a call with ``attention_mask`` / ``position_ids``
  only (the transformers-4.3x calling convention the references use) gets the rotary
  ``position_embeddings`` that transformers 5 layers expect; the wrapper is removed after;
- ``model.seqlen`` and ``model.hf_device_map = {}`` are set as the references' loaders do;
- on a machine without CUDA, ``torch.cuda.synchronize`` and ``Tensor.cuda`` (called
  unconditionally by SparseGPT and Wanda's magnitude) become no-ops during the call;
- GBLM's gradient script is a ``__main__`` block: its ``gradient_computation`` class is
  driven by the same loop (forward with labels, backward, ``update_gradient``), then
  the aggregate is stored as its script does (sqrt, fp16); ``transformers.AdamW``, which
  it imports but which transformers 5 removed, is aliased to ``torch.optim.AdamW``.

ADMM on a fixed mask is the reference's ``AdmmPruner.fasterprune`` with
``iterative_prune=0, per_out=True`` (its Wanda mask per output row); ADMM-Grad is its
default call (``iterative_prune=15``, whole-matrix selection).

Both sides are measured the same way after pruning: the keep-mask is ``W != 0``, the
reconstruction error of block ``i`` is ``||B_i^pruned(X) - B_i^dense(X)|| / ||B_i^dense(X)||``
on the calibration inputs ``X`` that reach block ``i`` through the pruned blocks before it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modules.data.windows import calibration_windows, eval_windows
from modules.engine.blocks import block_linears, capture_inputs, dense_weights, find_blocks, run_block
from modules.engine.models import load_model
from modules.engine.request import PruneRequest
from modules.evaluation.perplexity import perplexity
from modules.pruning.sparsity import SparsitySpec, parse_spec
from tests.engine.oracle import prune_model

METHODS = ("magnitude", "wanda", "sparsegpt", "gblm", "admm", "admm-grad")
REPO_OF = {
    "magnitude": "wanda",
    "wanda": "wanda",
    "sparsegpt": "sparsegpt",
    "gblm": "gblm",
    "admm": "admm",
    "admm-grad": "admm",
}
ENV_OF = {"wanda": "WANDA_DIR", "sparsegpt": "SPARSEGPT_DIR", "admm": "ADMM_DIR", "gblm": "GBLM_DIR"}


# ---------------------------------------------------------------- loading the references


def load_package(name: str, directory: Path) -> types.ModuleType:
    """Import ``directory`` (a folder of modules with relative imports) as package ``name``."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(directory)]
    sys.modules[name] = pkg
    return pkg


def ref_lib(repo: str, root: Path, module: str) -> types.ModuleType:
    """``lib/<module>.py`` of a Wanda-style clone, under a package name of its own.

    The three Wanda-derived repositories all call their package ``lib``; each is loaded
    as ``parity_<repo>_lib`` so that they never shadow one another.
    """
    name = f"parity_{repo}_lib"
    if name not in sys.modules:
        load_package(name, root / "lib")
    return importlib.import_module(f"{name}.{module}")


def ref_toplevel(root: Path, module: str) -> types.ModuleType:
    """A top-level module of a flat clone (SparseGPT's ``llama.py`` imports its siblings by name)."""
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(root))


def import_gblm_gradients(root: Path) -> types.ModuleType:
    """GBLM's ``gradient_computation.py`` (it imports ``transformers.AdamW``, gone in transformers 5)."""
    import transformers

    if not hasattr(transformers, "AdamW"):
        transformers.AdamW = torch.optim.AdamW
    spec = importlib.util.spec_from_file_location("parity_gblm_gradients", root / "gradient_computation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- adapting the model


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """The references print per layer (and tqdm bars on stderr): silence both while they run."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


class RefLayer(nn.Module):
    """A decoder layer callable the transformers-4.3x way (no ``position_embeddings``)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer = layer
        self._rotary = [rotary]  # not a submodule: find_layers must see the layer's linears only

    def forward(self, hidden, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if position_embeddings is None:
            position_embeddings = self._rotary[0](hidden, position_ids=position_ids)
        kwargs.pop("use_cache", None)
        return self.layer(
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )


@contextlib.contextmanager
def reference_model(model: nn.Module, seqlen: int) -> Iterator[nn.Module]:
    """``model`` dressed as the references expect, and undressed afterwards."""
    inner = model.model
    layers = inner.layers
    inner.layers = nn.ModuleList(RefLayer(layer, inner.rotary_emb) for layer in layers)
    model.seqlen = seqlen
    model.hf_device_map = {}
    patched = []
    if not torch.cuda.is_available():
        patched = [
            (torch.cuda, "synchronize", torch.cuda.synchronize),
            (torch.Tensor, "cuda", torch.Tensor.cuda),
        ]
        torch.cuda.synchronize = lambda *a, **k: None
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield model
    finally:
        for owner, attr, value in patched:
            setattr(owner, attr, value)
        inner.layers = layers
        del model.seqlen, model.hf_device_map


def loader_of(calib: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our windows in the references' loader format: ``(input (1, L), target (1, L))`` pairs."""
    return [(calib[i : i + 1], calib[i : i + 1].clone()) for i in range(calib.shape[0])]


@contextlib.contextmanager
def patched_loaders(module: types.ModuleType, calib: torch.Tensor) -> Iterator[None]:
    """``module.get_loaders`` returns our windows (and no test set) while inside."""
    before = module.get_loaders

    def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        if nsamples != calib.shape[0]:
            raise ValueError(f"reference asked for {nsamples} windows, parity has {calib.shape[0]}")
        return loader_of(calib), None

    module.get_loaders = get_loaders
    try:
        yield
    finally:
        module.get_loaders = before


def nm_of(spec: SparsitySpec) -> tuple[float, int, int]:
    """``(sparsity_ratio, prune_n, prune_m)`` in the references' convention (prune_n = pruned per group)."""
    if spec.is_nm:
        return (spec.m - spec.n) / spec.m, spec.m - spec.n, spec.m
    return spec.rate, 0, 0


# ---------------------------------------------------------------- the reference runs


@dataclass
class Refs:
    """Local clones by repository key (``wanda``, ``sparsegpt``, ``admm``, ``gblm``)."""

    dirs: dict[str, Path] = field(default_factory=dict)


def run_reference(
    method: str, model: nn.Module, tok, calib: torch.Tensor, spec: SparsitySpec, refs: Refs
) -> None:
    """Prune ``model`` in place with the reference repository's own function."""
    ratio, n, m = nm_of(spec)
    ns = argparse.Namespace(
        sparsity_ratio=ratio, nsamples=calib.shape[0], seed=0, use_variant=False, gradient_inv=False
    )
    dev = torch.device("cpu") if not torch.cuda.is_available() else next(model.parameters()).device
    root = refs.dirs[REPO_OF[method]]
    with reference_model(model, calib.shape[1]), quiet_stdout():
        if method in ("magnitude", "wanda"):
            prune = ref_lib("wanda", root, "prune")
            fn = prune.prune_magnitude if method == "magnitude" else prune.prune_wanda
            with patched_loaders(prune, calib):
                fn(ns, model, tok, dev, prune_n=n, prune_m=m)
        elif method == "sparsegpt":
            llama = ref_toplevel(root, "llama")
            llama.args = argparse.Namespace(
                nsamples=calib.shape[0],
                true_sequential=False,
                minlayer=-1,
                maxlayer=1000,
                prune_only="",
                invert=False,
                wbits=16,
                sparsity=ratio,
                prunen=n,
                prunem=m,
                percdamp=0.01,
                blocksize=128,
            )
            llama.llama_sequential(model, loader_of(calib), dev)
        elif method in ("admm", "admm-grad"):
            prune = ref_lib("admm", root, "prune")
            base = prune.AdmmPruner
            if method == "admm":

                class FixedMask(base):
                    def fasterprune(self, sparsity, prune_n=0, prune_m=0, percdamp=0.1, **_):
                        return super().fasterprune(
                            sparsity, prune_n, prune_m, percdamp, iterative_prune=0, per_out=True
                        )

                prune.AdmmPruner = FixedMask
            try:
                with patched_loaders(prune, calib):
                    prune.prune_admm(ns, model, tok, dev, prune_n=n, prune_m=m)
            finally:
                prune.AdmmPruner = base
        elif method == "gblm":
            with tempfile.TemporaryDirectory() as tmp:
                ns.gradient_path = reference_gblm_gradients(model, calib, root, Path(tmp))
                prune = ref_lib("gblm", root, "prune")
                with patched_loaders(prune, calib):
                    prune.prune_gblm(ns, model, tok, dev, prune_n=n, prune_m=m)
        else:
            raise ValueError(method)


def reference_gblm_gradients(model: nn.Module, calib: torch.Tensor, root: Path, tmp: Path) -> str:
    """GBLM's l2 gradient aggregate by its own class, stored as its script stores it; returns the file."""
    mod = import_gblm_gradients(root)
    was_training = model.training
    grad_up = mod.gradient_computation(model, 100)
    model.train()
    for k, (ids, labels) in enumerate(loader_of(calib), start=1):
        model(input_ids=ids, labels=labels).loss.backward()
        grad_up.update_gradient(model, k)
        model.zero_grad()
    model.train(was_training)
    grads = {name: g.sqrt().to(torch.float16) for name, g in grad_up.gradients_l2.items()}
    path = tmp / "gradients_l2.pth"
    torch.save(grads, path)
    return str(path)


def run_ours(
    method: str, model: nn.Module, calib: torch.Tensor, spec: SparsitySpec, options: dict | None = None
) -> None:
    """Prune ``model`` in place with the in-memory oracle (the method's defaults, or ``options``)."""
    from modules.engine.gradients import compute_gradients

    request = PruneRequest(method=method, spec=spec, options=dict(options or {}))
    with tempfile.TemporaryDirectory() as tmp:
        grads = compute_gradients(model, calib, tmp) if "grad" in request.needs() else None
        prune_model(model, calib, request, grads_dir=grads)


# ---------------------------------------------------------------- measurements


def keep_masks(model: nn.Module) -> list[torch.Tensor]:
    """``W != 0`` of every pruned linear, in block order."""
    _, blocks = find_blocks(model)
    dense = dense_weights(model)
    return [lin.weight.detach() != 0 for b in blocks for lin in block_linears(b, exclude=dense).values()]


@torch.no_grad()
def block_errors(dense: nn.Module, pruned: nn.Module, calib: torch.Tensor) -> list[float]:
    """Relative output error of each pruned block on the inputs that reach it through the pruned model."""
    _, dblocks = find_blocks(dense)
    _, pblocks = find_blocks(pruned)
    x, args = capture_inputs(pruned, calib, pblocks)
    errors = []
    for db, pb in zip(dblocks, pblocks, strict=True):
        y_dense, y = run_block(db, x, args), run_block(pb, x, args)
        errors.append(float((y - y_dense).norm() / y_dense.norm()))
        x = y
    return errors


@dataclass
class Side:
    """One side's result for one seed."""

    ppl: float
    seconds: float
    errors: list[float]
    masks: list[torch.Tensor]


def measure(run: Callable[[nn.Module], None], dense: nn.Module, calib, val) -> Side:
    """Prune a copy of ``dense`` with ``run``, timed, then measure it."""
    model = copy.deepcopy(dense)
    t = time.perf_counter()
    run(model)
    seconds = time.perf_counter() - t
    model.eval()
    ppl = perplexity(model, val, batch_size=32, progress=False)["ppl"]
    return Side(ppl, seconds, block_errors(dense, model, calib), keep_masks(model))


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Share of weights on which two sets of keep-masks agree."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.numel() for x in a)


def summarise(rows: list[tuple[Side, Side]]) -> dict:
    """Mean and spread over seeds of one method/setting."""
    diffs = [100 * (o.ppl / r.ppl - 1) for o, r in rows]
    nblocks = len(rows[0][0].errors)
    return {
        "agreement": statistics.mean(agreement(o.masks, r.masks) for o, r in rows),
        "ppl_ours": statistics.mean(o.ppl for o, _ in rows),
        "ppl_ref": statistics.mean(r.ppl for _, r in rows),
        "ppl_diff_pct": diffs,
        "ppl_diff_mean": statistics.mean(diffs),
        "ppl_diff_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "errors_ours": [statistics.mean(o.errors[i] for o, _ in rows) for i in range(nblocks)],
        "errors_ref": [statistics.mean(r.errors[i] for _, r in rows) for i in range(nblocks)],
        "time_ratio": statistics.mean(o.seconds for o, _ in rows)
        / statistics.mean(r.seconds for _, r in rows),
        "seconds_ours": statistics.mean(o.seconds for o, _ in rows),
        "seconds_ref": statistics.mean(r.seconds for _, r in rows),
    }


def print_table(results: dict[str, dict[str, dict]], seeds: int) -> None:
    """The markdown table of README's parity section."""
    print(
        f"\n| method | setting | mask agreement % | ppl ours / ref | ppl diff % (mean +- sd, {seeds} seeds) "
        "| block errors % ours | block errors % ref | time ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | --- | --- | ---: |")
    for method, per in results.items():
        for setting, s in per.items():
            eo = " / ".join(f"{100 * e:.2f}" for e in s["errors_ours"])
            er = " / ".join(f"{100 * e:.2f}" for e in s["errors_ref"])
            print(
                f"| {method} | {setting} | {100 * s['agreement']:.3f} "
                f"| {s['ppl_ours']:.2f} / {s['ppl_ref']:.2f} "
                f"| {s['ppl_diff_mean']:+.3f} +- {s['ppl_diff_sd']:.3f} "
                f"| {eo} | {er} | {s['time_ratio']:.2f} |"
            )


def compare(
    method: str, spec: SparsitySpec, dense, tok, calibs, val, refs: Refs, options: dict | None = None
) -> list[tuple[Side, Side]]:
    """Ours and the reference, one calibration set after the other; prints a line per seed."""
    rows = []
    for seed, calib in enumerate(calibs):
        ours = measure(lambda m, c=calib: run_ours(method, m, c, spec, options), dense, calib, val)
        ref = measure(lambda m, c=calib: run_reference(method, m, tok, c, spec, refs), dense, calib, val)
        rows.append((ours, ref))
        print(
            f"{method} {spec} seed {seed}: ppl {ours.ppl:.3f} / {ref.ppl:.3f} "
            f"({100 * (ours.ppl / ref.ppl - 1):+.3f}%), "
            f"masks agree {100 * agreement(ours.masks, ref.masks):.3f}%, "
            f"time {ours.seconds:.2f}s / {ref.seconds:.2f}s",
            flush=True,
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for repo, env in ENV_OF.items():
        ap.add_argument(f"--{repo}", default=os.environ.get(env, ""), help=f"local clone (default ${env})")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default="0.5,0.7,2:4")
    ap.add_argument("--seeds", type=int, default=5, help="calibration seeds 0..N-1")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        help="Topiary method option key=value (all methods), e.g. group=matrix",
    )
    ap.add_argument("--json", default="", help="also write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the parity benchmark; returns the exit status."""
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"parity: --methods: {', '.join(bad)} not among {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if any("=" not in kv for kv in args.option):
        print("parity: --option: expected key=value", file=sys.stderr)
        return 2
    options = dict(kv.split("=", 1) for kv in args.option)
    refs = Refs()
    for repo in ENV_OF:
        value = getattr(args, repo)
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                print(
                    f"parity: --{repo}: {path} is not a directory (a clone of the reference code)",
                    file=sys.stderr,
                )
                return 2
            refs.dirs[repo] = path
    runnable = []
    for method in methods:
        repo = REPO_OF[method]
        if repo in refs.dirs:
            runnable.append(method)
        else:
            print(f"{method}: skipped, no clone of its reference code (--{repo} or {ENV_OF[repo]})")
    if not runnable:
        return 0
    torch.set_num_threads(args.threads)
    settings = [parse_spec(pattern=s) if ":" in s else parse_spec(float(s)) for s in args.settings.split(",")]
    dense, tok = load_model("embedded")
    dense.eval()
    ctx = dense.config.max_position_embeddings
    val = eval_windows("embedded-validation", tok, args.seqlen, max_context=ctx)
    dense_ppl = perplexity(dense, val, batch_size=32, progress=False)["ppl"]
    print(
        f"embedded model, {args.nsamples} calibration windows of {args.seqlen} tokens, "
        f"seeds 0..{args.seeds - 1}, validation ppl over {val.shape[0]} windows "
        f"(dense {dense_ppl:.2f}), {args.threads} thread(s)"
    )
    calibs = [
        calibration_windows("embedded", tok, args.nsamples, args.seqlen, seed=s, max_context=ctx)
        for s in range(args.seeds)
    ]
    results: dict[str, dict[str, dict]] = {}
    for method in runnable:
        for spec in settings:
            rows = compare(method, spec, dense, tok, calibs, val, refs, options)
            results.setdefault(method, {})[str(spec)] = summarise(rows)
    if results:
        print_table(results, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_ppl": dense_ppl, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
