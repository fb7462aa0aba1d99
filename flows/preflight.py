"""Preflight: what a run needs, checked before Prefect starts, any weight loads or any network wait.

Each entry point (``topiary pipeline``, ``sweep`` and ``prune`` through :func:`preflight_run`
over their typed config, ``topiary eval`` through :func:`preflight_eval`, ``topiary
promote``/``registry`` through :func:`check_tracking`) runs every check that applies and
reports all failures at once, on one line (:class:`PreflightError`), each under the key it
blames: a config's dotted key (``prune.sparsity``), or for ``topiary prune`` the flag that
sets it (``--sparsity``, :data:`CLI_FLAGS`):

1. device: the one asked for exists here (``--device cuda`` without a GPU fails here);
2. model: the folder and ``config.json``, the weight files' headers hold every tensor
   the architecture needs (:func:`modules.engine.models.inspect_model`, on a meta-device
   skeleton), it has decoder blocks, its tokenizer loads; a folder checked before, with the
   same config, weight and tokenizer files and transformers, is answered from the cache
   (:func:`inspect_cached`) without importing transformers;
3. data: each source that the run reads (calibration only for a method that reads data:
   not magnitude) exists and reads (UTF-8 text, JSON lines, token-file shape), Hub data
   sets have a local copy or are reachable, ``seqlen`` fits the model's context;
4. sparsity: an N:M pattern's M divides every pruned linear's input width (from the
   skeleton); a user mask file exists; every weight matrix of the blocks is pruned or left
   dense on purpose (a router), and every tensor is read by the model's own name or through
   transformers' conversion rules (:func:`check_prunable`);
5. zero-shot tasks: known, and their data reachable;
6. tracking: the URI's scheme is MLflow's; an HTTP tracking server answers within
   :data:`PROBE_SECONDS`; a SQLite store's folder is writable (or, for the registry
   commands, the store exists) and an existing database takes a write lock within
   :data:`PROBE_SECONDS` (not locked by another process, not read-only);
7. output: the work folder or ``--output`` can be created here (not under a file, not
   in a read-only place).

Nothing is written: a failed preflight leaves no file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from configs.schema import PipelineCfg, PruneCfg
from modules.errors import TopiaryError

if TYPE_CHECKING:
    from pydantic import ValidationError

    from modules.engine.names import ModelInfo

# A check imports the engine it checks with (torch, transformers, lm-eval) when it runs: `topiary
# registry` and `promote` import this module for check_tracking alone, and a cached model check
# never imports transformers (inspect_cached).

# Seconds an HTTP tracking server gets to answer the probe (TOPIARY_PROBE_SECONDS overrides).
PROBE_SECONDS = float(os.environ.get("TOPIARY_PROBE_SECONDS", "5"))
_DISK_KEYS = {"": "disk", "work_dir": "work_dir", "output": "output"}

# The CLI's flag that sets each config key (the model is the commands' first argument).
CLI_FLAGS = {
    "model.name": "model",
    "model.devices": "--devices",
    "model.num_nodes": "--num-nodes",
    **{f"model.{k}": f"--{k}" for k in ("dtype", "device", "strategy")},
    **{f"data.{k}": f"--{k}" for k in ("calib", "nsamples", "seqlen", "seed")},
    **{f"prune.{k}": "--" + k.replace("_", "-") for k in PruneCfg.model_fields},
    "prune": "prune",
    "prune.options": "--option",
    "prune.options.mask_file": "--option mask_file",
    "prune.masks_from_options": "--masks-from-option",
    "work_dir": "--work-dir",
    "output": "--output",
}


class PreflightError(TopiaryError):
    """One or more inputs cannot run; the message lists each, naming its key or file."""


class Problems:
    """Collects the failures of independent checks, to report them all at once.

    ``names`` maps a config's dotted keys to the names the user knows them by (a CLI's flags);
    a key it does not map is named as it is.
    """

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self.items: list[str] = []
        self.names = names or {}

    def run(self, keys: str | dict[str, str], check: Callable, *args, **kwargs):
        """``check(*args, **kwargs)``; a :class:`TopiaryError` is recorded under ``keys``, None returned.

        ``keys`` is the config key it blames, or a map from the keys that the check's errors carry
        (:attr:`modules.errors.TopiaryError.key`: ``seqlen``) to config keys, ``""`` mapping any
        other (and an error that carries none).
        """
        keys = {"": keys} if isinstance(keys, str) else keys
        try:
            return check(*args, **kwargs)
        except (TopiaryError, FileNotFoundError) as err:
            self.add(keys.get(getattr(err, "key", None), keys[""]), getattr(err, "why", None) or str(err))
            return None

    def add(self, key: str, why: str) -> None:
        """Record the problem ``why`` under the user's name for the config key ``key``."""
        self.items.append(f"{self.names.get(key, key)}: {' '.join(why.split())}")

    def invalid(self, err: ValidationError) -> None:
        """Record each problem of a config that does not validate, under its key's name."""
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            why = e["msg"].removeprefix("Value error, ")
            if e["loc"]:  # the field's own name may lead a validator's message
                why = why.removeprefix(f"{e['loc'][-1]}: ")
            if e["type"] == "greater_than_equal":  # a count: in the words of the engine's own checks
                why = f"{e['input']!r} must be at least {e['ctx']['ge']}"
            self.add(key, why)

    def raise_any(self) -> None:
        if len(self.items) == 1:
            raise PreflightError(self.items[0])
        if self.items:
            raise PreflightError(f"{len(self.items)} problems: " + "; ".join(self.items))


def check_writable(path: str | Path) -> None:
    """``path`` (a folder) exists writable, or can be created: its nearest existing ancestor is
    a folder in which a folder can be made (tried with a temporary folder, removed at once).

    Raises:
        TopiaryError: ``path`` or an ancestor is a file, or the place is read-only.
    """
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == target else f"is under {probe}, which is a file"
        raise TopiaryError(f"{target} {where}, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".topiary-write-check-", dir=probe))
    except OSError as err:
        raise TopiaryError(
            f"{target}: cannot write in {probe} ({err.strerror or err}); choose a writable location"
        ) from None


def _sqlite_path(uri: str) -> Path:
    """The database file of ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


# The schemes of MLflow's tracking stores (tests/flows/test_bad_input.py checks them against MLflow's
# registry); a database scheme may name its driver (postgresql+psycopg2).
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql")
TRACKING_STORES = ("databricks", "databricks-uc", "uc")  # whole URIs, not schemes


def check_tracking(uri: str, *, must_exist: bool = False, timeout: float | None = None) -> None:
    """The MLflow tracking store at ``uri`` can be used, found without MLflow's retries.

    The scheme must be one of MLflow's (:data:`TRACKING_SCHEMES`). ``http(s)``: a GET of
    ``<uri>/health`` must get any HTTP answer within ``timeout`` seconds (default
    :data:`PROBE_SECONDS`). ``sqlite``: the database exists when ``must_exist`` (the
    registry commands never create an empty store), else its folder is writable; an
    existing database must take a write lock within ``timeout`` (:func:`_probe_sqlite`:
    not locked by another process, not read-only). A file store (a path or ``file:``)
    likewise. The other databases pass (their drivers are optional).

    Raises:
        TopiaryError: naming ``tracking.uri`` and what to do.
    """
    scheme = urlsplit(uri).scheme.lower()
    if uri not in TRACKING_STORES and scheme.partition("+")[0] not in TRACKING_SCHEMES:
        known = ", ".join(s for s in TRACKING_SCHEMES if s)
        raise TopiaryError(
            f"{uri}: {scheme!r} is not a tracking store scheme MLflow knows ({known}, "
            "databricks, or a folder path); e.g. sqlite:///mlflow.db",
            key="tracking.uri",
        )
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout or PROBE_SECONDS):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered: reachable
        except (urllib.error.URLError, OSError, ValueError) as err:
            why = getattr(err, "reason", None) or err
            raise TopiaryError(
                f"{uri} is not reachable ({why}); start the MLflow server, "
                "or set tracking.uri to a reachable server or sqlite:///mlflow.db",
                key="tracking.uri",
            ) from None
        return
    if scheme == "sqlite":
        store = _sqlite_path(uri)
    elif scheme in ("", "file"):
        store = Path(urlsplit(uri).path if scheme == "file" else uri)
    else:
        return
    if must_exist and not store.exists():
        raise TopiaryError(
            f"{uri}: no tracking store at {store} (nothing was tracked there yet); "
            "run `topiary pipeline` first, or point tracking.uri at the store",
            key="tracking.uri",
        )
    if not must_exist:
        try:
            check_writable(store.parent if scheme == "sqlite" or store.suffix else store)
        except TopiaryError as err:
            raise TopiaryError(f"{uri}: {err}", key="tracking.uri") from None
    if scheme == "sqlite" and store.is_file():
        _probe_sqlite(uri, store, timeout or PROBE_SECONDS)


def _probe_sqlite(uri: str, store: Path, timeout: float) -> None:
    """Write to the SQLite database ``store`` and roll back (nothing stays written), waiting at
    most ``timeout`` seconds for another writer's lock. (SQLite opens a file it may not write
    read-only without a word, and then takes locks: only a write tells.)

    Raises:
        TopiaryError: another process holds the lock past ``timeout``, or the file or its
            folder is read-only (or not a database).
    """
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{store}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            con.execute(f"PRAGMA user_version = {int(version)}")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as err:
        if "locked" in str(err):
            why = f"another process holds the write lock of {store} ({err} after {timeout:g} s); end it"
        else:
            why = f"{store} cannot be written ({err}); make it writable"
        raise TopiaryError(
            f"{uri}: {why}, or set tracking.uri to another store", key="tracking.uri"
        ) from None


def check_widths(info: ModelInfo | None, pattern: str | None) -> None:
    """An N:M pattern's M divides the input width of every linear of the decoder blocks.

    Raises:
        TopiaryError: naming the pattern, the first linear it does not fit and how many others.
    """
    from modules.pruning.sparsity import SpecError, parse_spec

    if info is None or pattern is None:
        return
    spec = parse_spec(None, pattern)
    bad = [(name, width) for name, width in info.widths.items() if width % spec.m]
    if bad:
        name, width = bad[0]
        more = f" (and {len(bad) - 1} more linears)" if len(bad) > 1 else ""
        raise SpecError(
            f"{spec}: M={spec.m} does not divide the input width {width} of {name}{more}; "
            f"the widths of {info.architecture} here are {sorted(set(info.widths.values()))}",
            key="pattern",
        )


def check_prunable(info: ModelInfo | None, prune: PruneCfg) -> None:
    """The streamed prune can read every tensor (by name or through transformers' conversion
    rules: :mod:`modules.engine.layouts`), and each weight matrix
    of the blocks is pruned or left dense on purpose (a router); fused experts are pruned by every
    method, with or without ``owl``.

    Raises:
        TopiaryError: naming the tensors a conversion rule cannot give, or the matrices that
            would stay dense without being reported.
    """
    from modules.engine.blocks import unsupported_message

    if info is None:
        return
    if info.converted:
        example = f" (on disk {info.unread[0]}; in the model {info.converted[0]})" if info.unread else ""
        raise TopiaryError(
            f"{info.path} stores {len(info.converted)} of {info.architecture}'s tensors under names "
            f"that transformers converts at load in a way a streamed prune cannot read yet{example}",
            key="model",
        )
    if info.unsupported:
        raise TopiaryError(unsupported_message(info.architecture, info.unsupported), key="model")


def _check_masks(prune: PruneCfg) -> None:
    """A user's ``mask_file`` (``selector="mask"``) exists and holds masks."""
    if prune.options.get("selector") == "mask" and "mask_file" in prune.options:
        from modules.engine.masks import MaskFile

        MaskFile(prune.options["mask_file"])


def _inspect_key(path: Path) -> str | None:
    """What decides :func:`inspect_cached` for the folder ``path``: its config, index, weight and
    tokenizer files (``tasks.cache.dir_sha256``: contents, or name, size and mtime for big
    ones) and transformers' version; None for a folder without ``config.json``."""
    from importlib.metadata import version

    from tasks.cache import TOKENIZER_FILES, dir_sha256

    if not (path / "config.json").is_file():
        return None
    files = dir_sha256(path, ("*.json", "*.safetensors", "*.bin", *TOKENIZER_FILES))
    rules = f"transformers {version('transformers')} inspect {INSPECT_RULES}"
    return hashlib.sha256(f"{files} {rules}".encode()).hexdigest()


INSPECT_RULES = 3  # raised when what inspect_model decides changes (3: tokenizer files checked too)


def inspect_cached(name: str) -> ModelInfo | None:
    """:func:`modules.engine.models.inspect_model` of ``name`` and, for a folder, the check that its
    tokenizer loads (:func:`modules.engine.models.load_tokenizer`); from the cache when the
    folder's config, weight and tokenizer files and transformers are as when it was last
    checked (a check that fails is never cached)."""
    from modules.data.cache import cache_dir
    from modules.engine.names import ModelInfo, resolve_model
    from modules.process import write_file

    path = Path(resolve_model(name))
    key = _inspect_key(path) if path.is_dir() else None
    cached = cache_dir() / "inspect" / f"{key}.json" if key else None
    if cached is not None and cached.is_file():
        try:
            info = ModelInfo.from_dict(json.loads(cached.read_text()))
            info.path = path  # the same files may lie in another folder
            return info
        except (ValueError, KeyError, TypeError):  # a damaged entry: check again
            pass
    from modules.engine.models import inspect_model, load_tokenizer

    info = inspect_model(name)
    if path.is_dir():
        load_tokenizer(path)
    if cached is not None and info is not None:
        write_file(cached, json.dumps(info.to_dict()))
    return info


def _check_model(problems: Problems, name: str, device: str) -> ModelInfo | None:
    from modules.engine.names import check_device

    problems.run("model.device", check_device, device)
    return problems.run("model.name", inspect_cached, name)


def preflight_run(
    cfg: PipelineCfg, jobs: list[PipelineCfg] | None = None, output: Path | None = None
) -> None:
    """Every check of a pipeline config, a sweep's (with its members ``jobs``), or with ``output``
    ``topiary prune``'s (the prune alone, into ``output``: no evaluation, no tracking; problems
    named by its flags, :data:`CLI_FLAGS`).

    Raises:
        PreflightError: listing every problem found.
    """
    from modules.data.windows import check_source

    problems = Problems(CLI_FLAGS if output is not None else None)
    model, data = cfg.model, cfg.data
    prunes = [job.prune for job in jobs or [cfg]]
    info = _check_model(problems, model.name, model.device)
    context = info.context if info else None
    reads = any(p.reads_data() for prune in prunes for p in (prune, prune.masks_source()) if p)
    if reads:  # magnitude reads no calibration data: its source is neither needed nor checked
        calib_keys = {"": "data.calib", "seqlen": "data.seqlen", "nsamples": "data.nsamples"}
        problems.run(calib_keys, check_source, data.calib, "calibration", data.nsamples, data.seqlen, context)
    windows = data.nsamples if reads else None
    problems.run("model.devices", check_processes, model.devices, model.num_nodes, model.device, windows)
    if model.processes > 1:
        problems.run("model.strategy", check_strategy, model.strategy, model.device)
    if model.num_nodes > 1 and output is None:  # topiary prune's nodes are torchrun's, not Dask's
        keys = {"": "model.nodes_address", "model.num_nodes": "model.num_nodes"}
        problems.run(keys, check_nodes, model.nodes_address, model.num_nodes)
    if output is None:
        eval_keys = {"": "data.eval", "seqlen": "data.eval_seqlen"}
        problems.run(eval_keys, check_source, data.eval, "evaluation", None, data.eval_seqlen, context)
    for pattern in sorted({p.pattern for p in prunes if p.pattern is not None}):
        problems.run("prune.pattern", check_widths, info, pattern)
    for prune in prunes:
        problems.run("prune.options.mask_file", _check_masks, prune)
    if cfg.zeroshot.enabled and output is None:
        from modules.evaluation.zeroshot import check_tasks

        problems.run("zeroshot.tasks", check_tasks, cfg.zeroshot.tasks, data_dir=cfg.zeroshot.data_dir)
    for prune in prunes:
        problems.run("model.name", check_prunable, info, prune)
    problems.run("work_dir" if output is None else "output", check_writable, output or cfg.work_dir)
    if output is None:
        problems.run("tracking.uri", check_tracking, cfg.tracking.uri)
    if not problems.items:  # the disk of what can run; the pruned models go under work_dir
        runs = [(p.method, data.nsamples, data.seqlen) for prune in prunes for p in _prunes(prune)]
        places = [("work_dir", Path(cfg.work_dir))] + ([("output", Path(output))] if output else [])
        problems.run(_DISK_KEYS, check_disk, model.name, model.dtype, runs, places)
    problems.raise_any()


def _prunes(prune: PruneCfg) -> list[PruneCfg]:
    """The prune ``prune`` and the one its ``masks_from`` names."""
    return [prune] + ([prune.masks_source()] if prune.masks_from else [])


def check_disk(
    model: str, dtype: str | None, runs: list[tuple[str, int, int]], places: list[tuple[str, Path]]
) -> None:
    """The free space of each disk of ``places`` (``(flag, path)``: the work folder, and the output
    folder unless it is under it) holds ``topiary plan``'s estimate of the prunes ``runs``
    (``(method, nsamples, seqlen)`` each: :func:`modules.engine.plan.run_disk`), the parts
    of places on one disk summed. A model whose ``config.json`` the estimate cannot read
    (not a LLaMA-style decoder) is not checked.

    Raises:
        TopiaryError: naming the flag, the path, the estimate and the free space.
    """
    import shutil

    from modules.engine.plan import fmt_bytes, host_memory, make_plan, read_arch, run_disk

    try:
        arch = read_arch(model)[0]
    except TopiaryError:
        return
    runs = [(_plan_method(m), n, q) for m, n, q in runs]
    runs = [(m, n, q) for m, n, q in runs if m is not None]
    plans = [
        make_plan(
            arch,
            method=m,
            device_memory=1 << 40,
            host_memory=host_memory(),
            nsamples=max(n, 1),
            seqlen=max(q, 2),
            dtype=dtype,
        )  # fmt: skip
        for m, n, q in runs
    ]
    sizes = [run_disk(plan) for plan in plans]
    work, out = sum(w for w, _ in sizes), sum(o for _, o in sizes)
    disks: dict[int, list] = {}
    for (flag, place), need in zip(places, [work + out] if len(places) == 1 else [work, out], strict=True):
        where = _existing(Path(place))
        disks.setdefault(where.stat().st_dev, [flag, place, where, 0])[3] += need
    for flag, place, where, need in disks.values():
        free = shutil.disk_usage(where).free
        if need > free:
            raise TopiaryError(
                f"{place}: the run needs about {fmt_bytes(need)} on this disk (topiary plan's estimate), "
                f"and {fmt_bytes(free)} is free at {where}; free space or choose a place on another disk",
                key=flag,
            )


def _plan_method(name: str) -> str | None:
    """The method of ``topiary plan``'s table that reads what registry method ``name`` reads
    (itself for the built-in ones; a method registered at run time maps to one with the same
    statistics), or None where none does: that run's disk is then not estimated."""
    from modules.pruning.registry import get_method
    from modules.pruning.traits import TRAITS

    if name in TRAITS:
        return name
    method = get_method(name)
    reads = set(method.needs) | (set() if method.data_free else {"sq_norm"})
    return next((known for known, traits in TRAITS.items() if traits.reads == reads), None)


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_processes(devices: int, num_nodes: int, device: str, nsamples: int | None) -> None:
    """DDP's processes: at least one per node and node, a GPU each on cuda, a window each (when the
    prune reads ``nsamples`` windows; None: it reads none)."""
    from modules.engine.names import check_device

    if devices < 1 or num_nodes < 1:
        raise TopiaryError(f"{devices} per node on --num-nodes {num_nodes}: each must be at least 1")
    try:
        kind = check_device(device).type
    except TopiaryError:  # reported under --device
        return
    if kind == "cuda":
        import torch

        if devices > torch.cuda.device_count():
            raise TopiaryError(
                f"{devices} processes, one per GPU, but this machine has {torch.cuda.device_count()}"
            )
    if nsamples is not None and devices * num_nodes > nsamples:
        raise TopiaryError(
            f"{devices * num_nodes} processes share {nsamples} calibration windows: at least one each"
        )


def check_strategy(strategy: str, device: str) -> None:
    """A Lightning strategy that can run here: fsdp and deepspeed need CUDA, deepspeed its package."""
    import importlib.util

    from modules.engine.names import check_device

    try:
        kind = check_device(device).type
    except TopiaryError:  # reported under --device
        return
    if strategy in ("fsdp", "deepspeed") and kind != "cuda":
        raise TopiaryError(f"{strategy} runs on CUDA only (Lightning's); on {kind} use ddp or model_parallel")
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise TopiaryError("deepspeed is not installed here (pip install deepspeed)")


def check_nodes(address: str, num_nodes: int) -> None:
    """A Dask scheduler at ``address`` with a worker for each of ``num_nodes`` machines."""
    from modules.engine.launch import node_workers

    with node_workers(address, num_nodes, timeout="5s"):
        pass


def preflight_eval(
    model: str,
    device: str,
    *,
    data: str | None = None,
    seqlen: int | None = None,
    batch_size: int = 1,
    tasks: list[str] | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
) -> None:
    """Every check of ``topiary eval ppl`` (``data``, ``seqlen``) or ``eval zeroshot`` (``tasks``).

    Raises:
        PreflightError: listing every problem found.
    """
    from modules.data.windows import check_source

    problems = Problems(CLI_FLAGS)
    if batch_size < 1:
        problems.items.append(f"--batch-size: {batch_size} must be at least 1")
    if limit is not None and limit < 1:
        problems.items.append(f"--limit: {limit} must be at least 1 (or leave it out for all items)")
    if tasks is not None:
        from modules.evaluation.zeroshot import check_tasks

        problems.run("--tasks", check_tasks, tasks, data_dir=data_dir)
    info = _check_model(problems, model, device)
    if data is not None:
        keys = {"": "--data", "seqlen": "--seqlen"}
        problems.run(keys, check_source, data, "evaluation", None, seqlen, info.context if info else None)
    problems.raise_any()
