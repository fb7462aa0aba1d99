"""The ``topiary`` command line: evaluate, prune, run the pipeline, manage the registry.

Bad input ends in one line on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from modules.errors import TopiaryError


def _kv(text: str) -> tuple[str, object]:
    """Parse ``key=value`` with a YAML value (numbers, booleans, lists)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _eval_ppl(args: argparse.Namespace) -> int:
    from modules.data import eval_windows
    from modules.models import load_model
    from modules.perplexity import perplexity

    model, tok = load_model(args.model, args.dtype, args.device)
    ids = eval_windows(args.data, tok, args.seqlen, max_context=model.config.max_position_embeddings)
    result = perplexity(model, ids, batch_size=args.batch_size)
    result.update(model=args.model, data=args.data)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.model} on {args.data}: ppl {result['ppl']:.3f} "
            f"(window {result['seqlen']}, {result['windows']} windows, {result['tokens']} tokens)"
        )
    return 0


def _eval_zeroshot(args: argparse.Namespace) -> int:
    from modules.models import load_model
    from modules.zeroshot import check_tasks, format_table, zeroshot

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_tasks(tasks, data_dir=args.data_dir)
    model, tok = load_model(args.model, args.dtype, args.device)
    result = zeroshot(model, tok, tasks, limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from tasks.prune import prune_to_dir

    report = prune_to_dir(
        model=args.model,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        owl=args.owl,
        options=dict(args.option or []),
        output=Path(args.output),
        dtype=args.dtype,
        device=args.device,
    )
    print(f"pruned {args.model} with {args.method} -> {args.output}")
    print(f"achieved sparsity {report['sparsity']:.4f}; report: {Path(args.output) / 'pruning_report.json'}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from configs.schema import PipelineCfg, load_config
    from flows.pipeline import run_pipeline

    run_pipeline(load_config(args.config, PipelineCfg, dict(args.set or [])))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from configs.schema import SweepCfg, load_config
    from flows.sweep import run_sweep

    run_sweep(load_config(args.config, SweepCfg, dict(args.set or [])))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from configs.schema import PipelineCfg, load_config
    from tasks.promote import promote

    cfg = load_config(args.config, PipelineCfg)
    decision = promote(args.run_id, cfg.gate, cfg.tracking)
    print(json.dumps(decision, indent=2, default=str))
    return 0


def _registry(args: argparse.Namespace) -> int:
    from configs.schema import PipelineCfg, load_config
    from tasks.promote import format_registry, registry_table

    cfg = load_config(args.config, PipelineCfg)
    print(format_registry(registry_table(cfg.tracking.registered_model, cfg.tracking)))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="`embedded`, a local directory or a Hugging Face Hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    top = argparse.ArgumentParser(prog="topiary", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows")
    _model_args(p)
    p.add_argument("--data", default="wikitext2", help="embedded, wikitext2, c4, or a .txt/.jsonl file")
    p.add_argument("--seqlen", type=int, default=128, help="window length in tokens (reported)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval_ppl)

    p = ev.add_parser("zeroshot", help="lm-eval zero-shot tasks")
    _model_args(p)
    p.add_argument(
        "--tasks",
        default="boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa",
        help="comma-separated lm-eval task names, or `embedded` for the embedded suite",
    )
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", default=None, help="local copies of the tasks' data sets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval_zeroshot)

    p = sub.add_parser("prune", help="prune a model one-shot and save it")
    _model_args(p)
    p.add_argument("--method", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--sparsity", type=float, help="unstructured rate in [0, 1)")
    group.add_argument("--pattern", help="N:M pattern such as 2:4")
    p.add_argument("--calib", default="embedded", help="calibration source (embedded, c4, file)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--owl", action="store_true", help="OWL non-uniform sparsity across blocks")
    p.add_argument("--option", type=_kv, action="append", help="method option key=value (repeatable)")
    p.add_argument("--output", required=True)
    p.set_defaults(func=_prune)

    for name, func, kind in (("pipeline", _pipeline, "pipeline.yaml"), ("sweep", _sweep, "sweep.yaml")):
        p = sub.add_parser(name, help=f"run the {name} flow")
        p.add_argument("--config", default=f"configs/{kind}")
        p.add_argument("--set", type=_kv, action="append", help="override a config key: a.b=value")
        p.set_defaults(func=func)

    p = sub.add_parser("promote", help="re-apply the promotion gate to a run")
    p.add_argument("run_id")
    p.add_argument("--config", default="configs/pipeline.yaml")
    p.set_defaults(func=_promote)

    p = sub.add_parser("registry", help="list registered versions and the champion")
    p.add_argument("--config", default="configs/pipeline.yaml")
    p.set_defaults(func=_registry)
    return top


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so every ``finally`` (server, MLflow run, temp files) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``topiary`` console script."""
    args = parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    # Outside a flow run SIGTERM raises Terminated; inside one, Prefect's engine raises its own.
    before = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except (TopiaryError, FileNotFoundError) as err:
        message = str(err).strip() or type(err).__name__
        print(f"topiary: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("topiary: interrupted", file=sys.stderr)
        return 130
    except BaseException as err:
        if isinstance(err, Terminated) or getattr(err, "signal", None) == signal.SIGTERM:
            print("topiary: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
