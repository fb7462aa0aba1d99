"""The ``topiary`` command line: evaluate, prune, run the pipeline, manage the registry.

Bad input, and an environment problem (no GPU, an unreachable server, a read-only
place), ends in one line on stderr and exit status 2; each command's preflight
(:mod:`flows.preflight`) finds them before any model work. An unexpected error is one
line and exit status 1. No traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from configs.loader import yaml_value
from configs.schema import (
    DataCfg,
    ModelCfg,
    PipelineCfg,
    PruneCfg,
    SweepCfg,
    ZeroShotCfg,
    load_config,
    model_defaults,
)
from modules.errors import TopiaryError


def _kv(text: str) -> tuple[str, object]:
    """Parse ``key=value`` with a YAML value (numbers, booleans, lists; ``2:4`` stays a pattern)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml_value(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


def _field(p, section, name: str, *flags: str, follows: bool = False, **override) -> argparse.Action:
    """Add the config field ``section.name`` as an argument: type, default, choices and help from the schema.

    ``flags`` default to ``--name`` (underscores as dashes); a ``bool`` field is a switch,
    a ``list[str]`` one a comma-separated value, a ``Literal`` one gets its choices.
    ``follows``: the default is the model's (:func:`configs.schema.model_defaults`), set
    after parsing. ``override`` replaces any of argparse's keywords.
    """
    from typing import Literal, get_args, get_origin

    info = section.model_fields[name]
    default = info.get_default(call_default_factory=True)
    ann = info.annotation
    kinds = [a for a in get_args(ann) if a is not type(None)] or [ann]
    kwargs: dict = {"default": None if follows else default}
    if ann is bool:
        kwargs["action"] = "store_true"
    elif get_origin(ann) is Literal:
        kwargs["choices"] = list(get_args(ann))
    elif get_origin(ann) is list:
        kwargs["type"] = _comma_list
    elif kinds[0] in (int, float):
        kwargs["type"] = kinds[0]
    kwargs.update(override)
    flags = flags or ("--" + name.replace("_", "-"),)
    shown = ",".join(default) if isinstance(default, list) else default
    if follows:
        suffix = " (default: the model's: embedded ones for `embedded`, else the papers')"
    elif ann is bool or shown is None or not flags[0].startswith("-"):
        suffix = ""
    else:
        suffix = f" (default: {shown})"
    kwargs["help"] = override.get("help") or (info.description or name) + suffix
    return p.add_argument(*flags, **kwargs)


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _follow_model(args: argparse.Namespace, **keys: str) -> None:
    """Set each unset ``args.<attr>`` to the model's default ``keys[attr]`` (``model_defaults``)."""
    defaults = model_defaults(args.model)
    for attr, key in keys.items():
        if getattr(args, attr) is None:
            setattr(args, attr, defaults[key])


def _eval_ppl(args: argparse.Namespace) -> int:
    from flows.preflight import preflight_eval

    _follow_model(args, data="eval")
    from modules.data.windows import eval_windows
    from modules.engine.models import load_model
    from modules.evaluation.perplexity import perplexity
    from modules.provenance import provenance

    preflight_eval(args.model, args.device, data=args.data, seqlen=args.seqlen, batch_size=args.batch_size)
    model, tok = load_model(args.model, args.dtype, args.device)
    ids = eval_windows(args.data, tok, args.seqlen, max_context=model.config.max_position_embeddings)
    result = perplexity(model, ids, batch_size=args.batch_size)
    result.update(model=args.model, data=args.data, provenance=provenance(model.device, model.dtype))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.model} on {args.data}: ppl {result['ppl']:.3f} "
            f"(window {result['seqlen']}, {result['windows']} windows, {result['tokens']} tokens)"
        )
    return 0


def _eval_zeroshot(args: argparse.Namespace) -> int:
    from flows.preflight import preflight_eval
    from modules.engine.models import load_model
    from modules.evaluation.zeroshot import format_table, zeroshot
    from modules.provenance import provenance

    _follow_model(args, tasks="tasks")
    tasks = args.tasks
    preflight_eval(
        args.model,
        args.device,
        tasks=tasks,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    model, tok = load_model(args.model, args.dtype, args.device)
    result = zeroshot(model, tok, tasks, limit=args.limit, batch_size=args.batch_size, data_dir=args.data_dir)
    result["provenance"] = provenance(model.device, model.dtype)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from flows.preflight import preflight_run

    cfg = _prune_config(args)
    output = Path(args.output)
    preflight_run(cfg, output=output)
    from flows.prune import prune_to_dir  # imports torch and the engine: after the checks

    progress = logging.getLogger("topiary")  # per-block progress lines, on stderr
    handler = logging.StreamHandler(sys.stderr)
    progress.addHandler(handler)
    level = progress.level
    progress.setLevel(logging.INFO)
    try:
        report = prune_to_dir(cfg.model, cfg.data, cfg.prune, output, cfg.work_dir, args.wait)
    finally:
        progress.removeHandler(handler)
        progress.setLevel(level)
    from modules.engine.ranks import writes

    if writes():  # under DDP, rank 0 speaks for all
        print(f"pruned {args.model} with {args.method} -> {args.output}")
        print(f"{report.summary()}; report: {output / 'pruning_report.json'}")
    return 0


def _prune_config(args: argparse.Namespace):
    """``topiary prune``'s flags as the pipeline's typed config, validated once; a problem is named
    by its flag (:data:`flows.preflight.CLI_FLAGS`), every one at once.

    The prune reads no evaluation data: ``data.eval`` names the calibration source (fingerprinted,
    never read). Its several nodes are ``torchrun``'s, not a Dask cluster's (no ``nodes_address``).
    """
    from pydantic import ValidationError

    from flows.preflight import CLI_FLAGS, Problems

    _follow_model(args, calib="calib")
    model = {"name": args.model, "dtype": args.dtype, "device": args.device, "strategy": args.strategy}
    model |= {"devices": args.devices, "num_nodes": args.num_nodes}
    data = {"calib": args.calib, "eval": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen}
    prune = {f: getattr(args, f) for f in ("method", "owl", "true_sequential", "moe_calibration")}
    prune |= {"expert_group": args.expert_group, "routers": args.routers, "batch_size": args.batch_size}
    prune |= {f: getattr(args, f) for f in ("report_error", "activations", "masks_from")}
    prune |= {"options": dict(args.option or []), "masks_from_options": dict(args.masks_from_option or [])}
    prune |= {k: v for k, v in (("sparsity", args.sparsity), ("pattern", args.pattern)) if v is not None}
    tree = {"model": model, "data": data | {"seed": args.seed}, "prune": prune, "work_dir": args.work_dir}
    try:
        return PipelineCfg.model_validate(tree, context={"nodes": "torchrun"})
    except ValidationError as err:
        problems = Problems(CLI_FLAGS)
        problems.invalid(err)
        problems.raise_any()


def _pipeline(args: argparse.Namespace) -> int:
    from flows.preflight import preflight_run
    from flows.server import temporary_server

    cfg = load_config(args.config, PipelineCfg, dict(args.set or []))
    preflight_run(cfg)  # before Prefect is even imported
    with temporary_server(meanwhile=lambda: importlib.import_module("flows.pipeline")):
        from flows.console import run_log
        from flows.pipeline import run_pipeline  # (imported while the server starts)

        with run_log(cfg.work_dir, "pipeline", args.verbose):
            run_pipeline(cfg, checked=True, wait=args.wait)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from flows.console import run_log
    from flows.preflight import preflight_run
    from flows.sweep import run_sweep, sweep_jobs

    cfg = load_config(args.config, SweepCfg, dict(args.set or []))
    preflight_run(cfg, sweep_jobs(cfg))
    with run_log(cfg.work_dir, "sweep", args.verbose):
        run_sweep(cfg, checked=True, wait=args.wait)
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Validate a config file and nothing else: no model, data or server is touched."""
    path = Path(args.config)
    try:
        raw = yaml_value(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable or not YAML: load_config says why, in one line
        raw = None
    sweep = isinstance(raw, dict) and bool({"methods", "settings", "runner"} & raw.keys())
    kind = SweepCfg if sweep else PipelineCfg
    cfg = load_config(path, kind, dict(args.set or []))
    if sweep:
        members = f"{', '.join(cfg.methods)} at {', '.join(cfg.settings)}"
        what = f"sweep config (model {cfg.model.name}: {members})"
    else:
        what = f"pipeline config (model {cfg.model.name}: {cfg.prune.method} at {cfg.prune.setting})"
    print(f"{path}: a valid {what}")
    return 0


def _clean(args: argparse.Namespace) -> int:
    from flows.prune import clean

    removed = clean(args.work_dir, args.wait)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} stale item(s) removed from {args.work_dir}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    from flows.preflight import check_tracking

    cfg = load_config(args.config, PipelineCfg)
    check_tracking(cfg.tracking.uri, must_exist=True)  # never creates an empty store; bounded wait
    from tracking.registry import promote

    decision = promote(args.run_id, cfg.gate, cfg.tracking)
    print(json.dumps(decision, indent=2, default=str))
    return 0


def _registry(args: argparse.Namespace) -> int:
    from flows.preflight import check_tracking

    cfg = load_config(args.config, PipelineCfg)
    check_tracking(cfg.tracking.uri, must_exist=True)
    from tracking.registry import format_registry, registry_table

    print(format_registry(registry_table(cfg.tracking.registered_model, cfg.tracking)))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from modules.engine.plan import format_plan, host_memory, make_plan, parse_size, read_arch

    device = parse_size(args.device_memory, "--device-memory")
    host = parse_size(args.host_memory, "--host-memory") if args.host_memory else host_memory()
    arch, path = read_arch(args.model)
    plan = make_plan(
        arch,
        method=args.method,
        device_memory=device,
        host_memory=host,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        dtype=args.dtype,
        tflops=args.tflops,
        disk_gbps=args.disk_gbps,
        expert_group=args.expert_group,
        moe_calibration=args.moe_calibration,
    )
    print(format_plan(plan, str(path)))
    return 0


def _server(args: argparse.Namespace) -> int:
    from flows.server import running_server, start_lasting_server, stop_lasting_server

    if args.action == "start":
        state, started = start_lasting_server(port=args.port)
        what = "started" if started else "already running"
        print(f"{what}: {state['url']} (UI {state['ui']}, pid {state['pid']})")
    elif args.action == "stop":
        state = stop_lasting_server()
        print(f"stopped pid {state['pid']} ({state['url']})" if state else "not running")
    else:
        state = running_server()
        print(f"running: {state['url']} (UI {state['ui']}, pid {state['pid']})" if state else "not running")
    return 0


def _wait_flag(p: argparse.ArgumentParser) -> None:
    """``--no-wait``, of every command that writes a work folder (and so takes its lock)."""
    p.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="when another run holds the work folder, refuse at once (exit 2) instead of waiting for it",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    _field(p, ModelCfg, "name", "model")
    _field(p, ModelCfg, "dtype")
    _field(p, ModelCfg, "device")


class _MethodNames:
    """The registered methods' names, read only when a help text is printed (the registry imports torch)."""

    def __str__(self) -> str:
        from modules.pruning.registry import METHODS

        return ", ".join(METHODS)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``topiary: error: ...``), exit status 2."""

    def error(self, message: str):
        where = self.prog.removeprefix("topiary").strip()
        self.exit(2, f"topiary: error: {where + ': ' if where else ''}{message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    top = _Parser(prog="topiary", description=__doc__.splitlines()[0])
    top.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = top.add_subparsers(dest="command", required=True)
    _eval_parsers(sub)
    _prune_parser(sub)
    _plan_parser(sub)
    _flow_parsers(sub)
    _admin_parsers(sub)
    return top


def _method_help() -> str:
    return f"pruning method: %(methods)s (default: {PruneCfg.model_fields['method'].default})"


def _eval_parsers(sub) -> None:
    """``topiary eval ppl`` and ``topiary eval zeroshot``."""
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    p = ev.add_parser("ppl", help="perplexity over non-overlapping windows")
    _model_args(p)
    _field(p, DataCfg, "eval", "--data", follows=True)
    _field(p, DataCfg, "eval_seqlen", "--seqlen")
    _field(p, DataCfg, "eval_batch_size", "--batch-size")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval_ppl)

    p = ev.add_parser("zeroshot", help="lm-eval zero-shot tasks")
    _model_args(p)
    _field(p, ZeroShotCfg, "tasks", follows=True)
    _field(p, ZeroShotCfg, "limit")
    _field(p, ZeroShotCfg, "batch_size")
    _field(p, ZeroShotCfg, "data_dir")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval_zeroshot)


def _prune_parser(sub) -> None:
    """``topiary prune``: the flags of the model, data and prune sections it validates as a config."""
    p = sub.add_parser("prune", help="prune a model one-shot and save it")
    _model_args(p)
    _field(p, PruneCfg, "method", help=_method_help()).methods = _MethodNames()  # %(methods)s
    group = p.add_mutually_exclusive_group()
    _field(group, PruneCfg, "sparsity", default=None, help="unstructured rate in [0, 1) (default: 0.5)")
    _field(group, PruneCfg, "pattern")
    for name in ("calib", "nsamples", "seqlen", "seed"):
        _field(p, DataCfg, name, follows=name == "calib")
    for name in ("owl", "true_sequential", "moe_calibration", "expert_group", "routers", "batch_size"):
        _field(p, PruneCfg, name)
    option = "method option key=value, repeatable (a wrong one is reported with the method's options)"
    repeated = {"type": _kv, "action": "append", "default": None}
    _field(p, PruneCfg, "options", "--option", dest="option", help=option, **repeated)
    for name in ("report_error", "activations", "masks_from"):
        _field(p, PruneCfg, name)
    source = "an option of the --masks-from method's prune, key=value, repeatable"
    _field(p, PruneCfg, "masks_from_options", "--masks-from-option", dest="masks_from_option", help=source,
           **repeated)  # fmt: skip
    p.add_argument("--output", required=True, help="folder for the pruned model and its report")
    _field(p, PipelineCfg, "work_dir", help="resume state and calibration windows (default: .topiary)")
    ddp = "processes (DDP) on this machine, one per GPU on cuda; each takes a share of the windows"
    p.add_argument("--devices", type=int, default=1, help=f"{ddp} (default: 1)")
    p.add_argument(
        "--num-nodes", type=int, default=1, help="machines, each with --devices processes (default: 1)"
    )
    _field(p, ModelCfg, "strategy")
    _wait_flag(p)
    p.set_defaults(func=_prune)


def _plan_parser(sub) -> None:
    """``topiary plan``: memory, disk and time of a prune from ``config.json``."""
    p = sub.add_parser("plan", help="memory, disk and time of a prune, from config.json alone")
    p.add_argument("model", help="`embedded`, a model folder, a config.json, or a Hub id in the local cache")
    p.add_argument("--device-memory", required=True, help="memory of the device, e.g. 24GB, 80GiB")
    p.add_argument("--host-memory", help="host memory (default: this machine's)")
    _field(p, PruneCfg, "method", help=_method_help()).methods = _MethodNames()  # %(methods)s
    _field(p, DataCfg, "nsamples")
    _field(p, DataCfg, "seqlen")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--tflops", type=float, default=50.0, help="assumed device throughput, TFLOP/s")
    p.add_argument("--disk-gbps", type=float, default=1.0, help="assumed disk rate (reads, writes), GB/s")
    for name in ("expert_group", "moe_calibration"):
        _field(p, PruneCfg, name)
    p.set_defaults(func=_plan)


def _flow_parsers(sub) -> None:
    """``topiary pipeline``, ``topiary sweep`` (their config and ``--set`` overrides) and ``validate``."""
    for name, func, kind in (("pipeline", _pipeline, "pipeline.yaml"), ("sweep", _sweep, "sweep.yaml")):
        p = sub.add_parser(name, help=f"run the {name} flow")
        p.add_argument("--config", default=f"configs/{kind}")
        p.add_argument("--set", type=_kv, action="append", help="override a config key: a.b=value")
        p.add_argument(
            "--verbose",
            action="store_true",
            help="show third-party log lines (Prefect, lm-eval, transformers) on the console too; "
            "they always go to the run's log file",
        )
        _wait_flag(p)
        p.set_defaults(func=func)

    p = sub.add_parser("validate", help="check a config file (every problem at once) and nothing else")
    p.add_argument("config")
    p.add_argument("--set", type=_kv, action="append", help="override a config key: a.b=value")
    p.set_defaults(func=_validate)


def _admin_parsers(sub) -> None:
    """``topiary clean``, ``server``, ``promote`` and ``registry``."""
    p = sub.add_parser("clean", help="remove resume state and what killed runs left")
    p.add_argument(
        "--work-dir",
        default=PipelineCfg.model_fields["work_dir"].default,
        help="the work folder (default: .topiary)",
    )
    _wait_flag(p)
    p.set_defaults(func=_clean)

    p = sub.add_parser(
        "server", help="a long-lived local Prefect server (and UI) that flows use while it runs"
    )
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, help="port for `start` (default: a free one)")
    p.set_defaults(func=_server)

    p = sub.add_parser("promote", help="re-apply the promotion gate to a run")
    p.add_argument("run_id")
    p.add_argument("--config", default="configs/pipeline.yaml")
    p.set_defaults(func=_promote)

    p = sub.add_parser("registry", help="list registered versions and the champion")
    p.add_argument("--config", default="configs/pipeline.yaml")
    p.set_defaults(func=_registry)


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so every ``finally`` (server, MLflow run, temp files) runs."""


GRACE_S = 8.0
"""Seconds a signalled run has to end: its ``finally`` blocks, then the interpreter's exit."""
LINES = {signal.SIGINT: "topiary: interrupted", signal.SIGTERM: "topiary: terminated"}
_ending: dict[str, object] = {}  # the signal being handled, and whether its line was printed


def _say_ending(signum: int) -> int:
    """Print the signal's one line (once per process); the exit status, 128 + ``signum``."""
    if not _ending.get("said"):
        _ending["said"] = True
        print(LINES[signum], file=sys.stderr, flush=True)
    return 128 + signum


def _end_within_grace(signum: int) -> None:
    """End the process :data:`GRACE_S` s after the first signal, however far its clean-up got.

    Past the ``finally`` blocks, the interpreter's exit joins non-daemon threads and runs
    library ``atexit`` hooks (Prefect's, lm-eval's, torch's) that may wait on a server this
    run has stopped; the process must not outlive the signal by more than the grace. Ending
    it then is what SIGKILL does, which every stage survives: the lock is the kernel's, the
    server dies with its parent, temporaries and a RUNNING MLflow run are cleaned by the next run.
    """
    if "signal" in _ending:
        return
    _ending["signal"] = signum

    def expire() -> None:
        status = _say_ending(signum)
        sys.stdout.flush()
        os._exit(status)

    timer = threading.Timer(GRACE_S, expire)
    timer.daemon = True
    timer.start()


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT raises ``KeyboardInterrupt``, SIGTERM :class:`Terminated`; both arm the grace."""
    _end_within_grace(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated()


def _remove_unused_folders() -> None:
    """Remove the folders ``import flows`` made (Prefect's home) if nothing was written in them."""
    import flows

    for path in reversed(flows.CREATED):
        with contextlib.suppress(OSError):  # not empty: Prefect used it
            path.rmdir()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``topiary`` console script.

    Exit status: 0 done; 2 bad input or an environment problem (one line on stderr);
    1 an unexpected error (one line; ``--debug`` shows its traceback); 130 interrupted;
    143 terminated (SIGTERM).
    """
    try:
        args = parser().parse_args(argv)
    except SystemExit:
        _remove_unused_folders()
        raise
    _ending.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    # Outside a flow run SIGTERM raises Terminated; inside one, Prefect's engine raises its own
    # and then sends SIGTERM again to this handler. SIGINT is handled even where it was
    # inherited ignored (a job started with & by a script): Python would never interrupt then.
    before = {s: signal.signal(s, _on_signal) for s in LINES} if main_thread else {}
    done = False
    try:
        status = args.func(args)
        done = True
        return status
    except Exception as err:
        # raised while the run unwound from a signal: after our handler ran, or from Prefect's
        # crash handling of its own signal exception (which is then in the chain)
        signum = _ending.get("signal") or _signal_in(err)
        if signum:
            return _say_ending(signum)
        if args.debug:
            raise
        return _error_status(err)
    except BaseException as err:
        signum = _signal_in(err)
        if signum:
            return _say_ending(signum)
        raise
    finally:
        if not done:
            _remove_unused_folders()
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _signal_in(err: BaseException) -> int | None:
    """The signal an exception or one in its chain (cause, context) stands for: SIGINT for
    ``KeyboardInterrupt``, SIGTERM for :class:`Terminated` or an exception whose ``signal`` is
    SIGTERM (Prefect's); None if none does."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(err, Terminated) or getattr(err, "signal", None) == signal.SIGTERM:
            return signal.SIGTERM
        err = err.__cause__ or err.__context__
    return None


def _error_status(err: Exception) -> int:
    """Print an error's one line; its exit status: 2 for bad input or the environment, 1 else."""
    if isinstance(err, (TopiaryError, FileNotFoundError)):
        print(f"topiary: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if isinstance(err, OSError):  # the environment: a full disk, a permission, a vanished file
        # a copy's error names its source first and the file it writes second (shutil)
        written = err.filename2 if err.errno == errno.ENOSPC and err.filename2 else err.filename
        where = f" ({written})" if written else ""
        print(
            f"topiary: error: {err.strerror or _one_line(err)}{where}; free space or fix the path",
            file=sys.stderr,
        )
        return 2
    what = f"unexpected {type(err).__name__}: {_one_line(err)}"
    print(f"topiary: error: {what} (run with --debug for the traceback)", file=sys.stderr)
    return 1


def console() -> None:
    """The ``topiary`` console script (and ``python -m flows.cli``): :func:`main`, then exit.

    The objects alive at the end are frozen first (``gc.freeze``), so that the interpreter's
    last garbage collections skip them: after a pipeline they walk the millions of objects
    of torch, transformers, lm-eval and MLflow for 2.3 s, to free memory the exit frees anyway.
    """
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    console()
