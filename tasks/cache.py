"""Cache keys, artefact paths and stage measurements shared by every Prefect task.

How a Topiary task is cached (the same for every stage):

- Its key is a sha256 over a *key function* of the task's parameters: the config
  sections that change its output, the fingerprints of its data and model, and the
  content hashes of upstream artefacts (never their paths, never tensors). Each stage
  writes its key function next to its task (``calibration_key`` in ``tasks/windows.py``,
  ``prune_key`` in ``tasks/update.py``, ...); :func:`cache_key_fn` turns one into a
  Prefect ``cache_key_fn``. Every key also holds :func:`code_fingerprint` (the sources
  that compute results, and torch's version), so changed code never serves results of
  the old one. Bump :data:`CACHE_VERSION` to invalidate everything.
- Results are small dicts (paths, hashes, figures) persisted by Prefect as files in
  ``<work_dir>/prefect-results`` (the flow's ``result_storage``), so the cache works
  across processes: the cache lives in the result files, not in Prefect's database.
- Tensors are never task results: a stage saves them itself (safetensors, written to a
  temporary name, then renamed) under ``<work_dir>/<stage>/`` in a file or folder named by
  the key, and returns an :class:`Artifact` (``{"path", "sha256"}`` and its figures).
- When a stage's artefact has been deleted, the cached result would point at nothing:
  the key function then drops that stale record, so the stage runs again.
- Tasks are declared with :func:`task`, Prefect's ``@task`` built on first use: a task's
  function (``.fn``) runs without importing Prefect, which ``topiary prune`` never needs.
- A key digests typed parameters (configs, the engine's job) in their JSON form
  (:func:`canonical`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic reads it on Python 3.11

from modules.errors import TopiaryError
from modules.process import (  # one write-then-rename for every stage
    building,
    file_sha256,
    owner_tag,
    remove_stale,
    tag_alive,
    write_file,
)

if TYPE_CHECKING:
    import torch

CACHE_VERSION = "1"
ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("modules", "tasks")  # the code whose changes change results
RESULTS_DIR = "prefect-results"
BIG_FILE_BYTES = 512 << 20  # bytes; larger weight files are fingerprinted by name, size and mtime


class Artifact(TypedDict):
    """A stage's result that names what it wrote: the file or folder and its content hash.

    Results carry more (``shape``, ``key``, the stage's figures); keys read these two only.
    """

    path: str
    sha256: str


def _json_form(obj: Any) -> Any:
    """The JSON form of a typed parameter: a config's fields, the engine's ``to_json``; else its str."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return str(obj)


def canonical(obj: Any) -> str:
    """Deterministic JSON of ``obj`` (sorted keys, no spaces); typed objects in their JSON form."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_form)


def digest(obj: Any) -> str:
    """sha256 (hex) of :func:`canonical` ``(obj)``."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def stage_key(stage: str, **parts: Any) -> str:
    """The cache key of ``stage`` given everything its output depends on."""
    return digest({"stage": stage, "version": CACHE_VERSION, "code": code_fingerprint(), **parts})


@functools.lru_cache(maxsize=4)
def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 over the ``.py`` files under :data:`CODE_DIRS` of ``root``, and torch's version."""
    import torch

    return digest({"torch": torch.__version__, **{d: dir_sha256(root / d, ("*.py",)) for d in CODE_DIRS}})


def dir_sha256(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """sha256 over the relative names and contents of the files under ``path`` matching ``patterns``.

    Files larger than :data:`BIG_FILE_BYTES` enter by name, size and modification time
    (hashing tens of GB on every run would cost minutes); a copied checkpoint then gets a
    new fingerprint, which only costs a recomputation.
    """
    root = Path(path)
    files = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        stat = p.stat()
        if stat.st_size > BIG_FILE_BYTES:
            h.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        else:
            h.update(f"{rel}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model", "*.tiktoken")


def model_fingerprint(name: str) -> dict[str, str]:
    """Fingerprints of a model (all its files) and of its tokenizer files alone.

    ``embedded`` and local folders are hashed by content; a Hub id only by its name (its
    files may change upstream: use a local copy for exact reproduction).
    """
    from modules.engine.names import resolve_model

    path = Path(resolve_model(name))
    if path.is_dir():
        return {"model": dir_sha256(path), "tokenizer": dir_sha256(path, TOKENIZER_FILES)}
    hub = digest({"hub": name})
    return {"model": hub, "tokenizer": hub}


def ref_hash(ref: Artifact | None) -> str | None:
    """The content hash of an artefact reference ``{"path", "sha256", ...}`` (None stays None)."""
    return None if ref is None else ref["sha256"]


def results_dir(work_dir: str | Path) -> Path:
    """Where Prefect persists task results (the flows' ``result_storage``)."""
    return Path(work_dir).resolve() / RESULTS_DIR


def artifact_path(work_dir: str | Path, stage: str, key: str, suffix: str = "") -> Path:
    """``<work_dir>/<stage>/<key[:16]><suffix>``: where a stage writes its tensors."""
    return Path(work_dir).resolve() / stage / f"{key[:16]}{suffix}"


def run_folder(work_dir: str | Path, key: str) -> Path:
    """Where a stage's resume state lives until it completes: a prune's (activations,
    statistics, masks, shards) or the gradient step's. ``topiary clean`` removes them."""
    return artifact_path(work_dir, "runs", key)


def run_logger() -> logging.Logger:
    """The Prefect run's logger inside a flow or task run, else the ``topiary`` logger."""
    if "prefect" not in sys.modules:  # no run without it (and topiary prune never imports it)
        return logging.getLogger("topiary")
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run: the topiary logger
        return logging.getLogger("topiary")


NO_CACHE = "no_cache"  # task(cache_policy=NO_CACHE): Prefect's NO_CACHE policy


class LazyTask:
    """A Prefect task built on first use; ``fn`` is the plain function (no Prefect import).

    Calling it, ``.submit``, ``.with_options`` and every other attribute go to the task,
    ``prefect.task(**options)(fn)``, built once.
    """

    def __init__(self, fn: Callable, options: dict[str, Any]):
        functools.update_wrapper(self, fn)
        self.fn, self._options, self._task = fn, options, None

    def task(self):
        if self._task is None:
            from prefect import task
            from prefect.cache_policies import NO_CACHE as PREFECT_NO_CACHE

            options = dict(self._options)
            if options.get("cache_policy") == NO_CACHE:
                options["cache_policy"] = PREFECT_NO_CACHE
            self._task = task(**options)(self.fn)
        return self._task

    def __call__(self, *args, **kwargs):
        return self.task()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends: not the task's
            raise AttributeError(name)
        return getattr(self.task(), name)


def task(**options) -> Callable[[Callable], LazyTask]:
    """``@task(...)`` with Prefect's keywords: a :class:`LazyTask`.

    Raises:
        TypeError: the task does not take a parameter that its :func:`cache_key_fn` needs
            (Prefect would only log it at run time, and never cache the task).
    """

    def declare(fn: Callable) -> LazyTask:
        needs = getattr(options.get("cache_key_fn"), "needs", ())
        missing = sorted(set(needs) - set(inspect.signature(fn).parameters))
        if missing:
            needed = ", ".join(missing)
            raise TypeError(f"task {fn.__name__}: its cache key needs {needed}, which it does not take")
        return LazyTask(fn, options)

    return declare


def _parameters_of(fn: Callable, parameters: dict[str, Any]) -> dict[str, Any]:
    """The task's ``parameters`` that ``fn`` names."""
    return {n: parameters[n] for n in inspect.signature(fn).parameters if n in parameters}


def cache_key_fn(key: Callable[..., str], artifact: Callable[..., Path] | None = None):
    """Turn a stage's key function into a Prefect ``cache_key_fn``.

    Args:
        key: a function whose parameters are named like (a subset of) the task's
            parameters; it is called with those and returns the stage key.
        artifact: ``(key, <task parameters by name>) -> path`` of what the stage writes; when
            that path is missing, the stale cached result (if any) is removed so the stage re-runs.

    Returns:
        ``fn(context, parameters) -> key`` for ``@task(cache_key_fn=...)``.
    """

    def fn(context: Any, parameters: dict[str, Any]) -> str:
        value = key(**_parameters_of(key, parameters))
        if artifact is not None and "work_dir" in parameters:
            if not artifact(value, **_parameters_of(artifact, parameters)).exists():
                (results_dir(parameters["work_dir"]) / value).unlink(missing_ok=True)
        return value

    fn.__name__ = f"cache_key_of_{key.__name__}"
    fn.needs = [*_required(key), *_required(artifact)[1:]] if artifact else _required(key)
    return fn


def _required(fn: Callable) -> list[str]:
    """The parameters of ``fn`` without a default."""
    return [n for n, p in inspect.signature(fn).parameters.items() if p.default is inspect.Parameter.empty]


LOCK_FILE = "lock"
HOLDER_FILE = "lock.holder.json"  # beside the lock: who holds it (it informs; the lock is the kernel's)


def _command_line() -> str:
    """This process's command line as a user typed it (``topiary prune ...`` for the CLI)."""
    if sys.argv and Path(sys.argv[0]).name in ("topiary", "cli.py"):
        return shlex.join(["topiary", *sys.argv[1:]])
    return shlex.join(sys.orig_argv)


def lock_holder(work_dir: str | Path) -> str:
    """Who holds the lock of ``work_dir``, from its holder record: ``pid P (command) since T``.

    A record whose process is dead (killed before it could remove it) names nobody: the
    lock is the kernel's, and a dead holder's lock is already free.
    """
    try:
        record = json.loads((Path(work_dir) / HOLDER_FILE).read_text(encoding="utf-8"))
        if tag_alive(record["owner"]):
            return f"pid {record['pid']} ({record['command']}) since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "another process (it has not written its holder record yet)"


@contextmanager
def work_lock(work_dir: str | Path, wait: bool = True) -> Iterator[Path]:
    """Hold ``<work_dir>/lock`` (``fcntl.flock``) for a whole run of a command that writes the work folder.

    Every such command takes it (``topiary prune``, ``pipeline``, ``sweep``, ``clean``); reads
    (``plan``, ``validate``) do not. Two runs on one folder would otherwise remove each other's
    resume state or compute the same steps twice; the second one says on stderr who holds the
    folder (:func:`lock_holder`) and waits, or with ``wait=False`` (``--no-wait``) raises
    :class:`~modules.errors.TopiaryError` with that line at once. The lock is the kernel's: it
    ends with its holder, however that dies; the holder record ``lock.holder.json`` beside it
    only says who holds it. On entry, temporary entries of dead runs are removed from the work
    folder and ``$TMPDIR`` (:func:`modules.process.remove_stale`).
    """
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    path, record = work / LOCK_FILE, work / HOLDER_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"work folder {work} is in use by {lock_holder(work)}"
            if not wait:
                raise TopiaryError(
                    f"{busy}; wait for it to end (without --no-wait) or use another work folder"
                ) from None
            print(f"topiary: {busy}; waiting for it to end", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        holder = {"owner": owner_tag(), "pid": os.getpid(), "command": _command_line(), "since": since}
        write_file(record, json.dumps(holder))
        remove_stale([work], depth=2, tmp_dir=Path(tempfile.gettempdir()))
        try:
            yield path
        finally:
            record.unlink(missing_ok=True)  # before the lock goes: the next holder's record stays
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_tensors(tensors: dict[str, torch.Tensor], final: Path) -> Artifact:
    """Save tensors as safetensors under ``final`` atomically; return ``{"path", "sha256"}``."""
    from safetensors.torch import save_file

    with building(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return {"path": str(final), "sha256": file_sha256(final)}


@contextmanager
def measure(interval: float = 0.05) -> Iterator[dict[str, float]]:
    """Time a stage and record its peak memory; fills the yielded dict on exit.

    ``seconds`` is wall time. ``peak_mem_mb`` is the high-water mark of this process's
    resident memory (psutil RSS, sampled every ``interval`` s by a thread; it includes
    whatever else the process runs meanwhile, e.g. other sweep members in threads).
    ``peak_gpu_mb`` is ``torch.cuda.max_memory_allocated`` when CUDA is in use.
    """
    import psutil
    import torch

    proc = psutil.Process()
    figures: dict[str, float] = {}
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], proc.memory_info().rss)

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield figures
    finally:
        figures["seconds"] = round(time.perf_counter() - start, 3)
        stop.set()
        sampler.join()
        figures["peak_mem_mb"] = round(max(peak[0], proc.memory_info().rss) / 2**20, 1)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
