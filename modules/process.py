"""What a Topiary process leaves on disk, and how the next one knows whether its owner died.

A killed process cannot clean up after itself, so everything it writes half-way carries
its owner's identity, and the next start removes what belongs to dead owners:

- :func:`owner_id` names this process as ``<pid>-<start>`` (``start``: its start time in
  centiseconds since boot, so a re-used pid is not mistaken for the old process);
  :func:`owner_alive` tells whether such an owner still runs (on this host).
- :func:`temp_sibling` is the one temporary name of every write-then-rename:
  ``.<name>.tmp-<pid>-<start>-<thread>`` beside the final path (same file system, so the
  rename is atomic; unique per process and thread). :func:`building` and
  :func:`write_file` use it.
- :func:`remove_stale` deletes, in the given folders, the temporary entries whose owner is
  dead (also ``topiary-<kind>-<pid>-<start>-*`` folders in ``$TMPDIR``, named by
  :func:`temp_prefix`).
- :func:`pause_point` is a test hook: with ``TOPIARY_TEST_PAUSE_AT=<stage>`` in the
  environment, the process prints ``TOPIARY_PAUSED <stage> <pid>`` on stderr at that stage
  and sleeps, so a test can kill it exactly there. Nothing else sets that variable.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PAUSE_ENV = "TOPIARY_TEST_PAUSE_AT"
TEMP_KINDS = ("grads", "stream", "spawn")  # what Topiary keeps in $TMPDIR (see temp_prefix)
# ``.<name>.tmp-<pid>-<start>-<thread>`` and the trash of a replaced folder,
# ``.<name>.old-<pid>-<start>-<thread>``. (Older versions wrote ``.tmp-<pid>-<thread>``:
# read that way, the thread id is no start time of a live process, so they count as stale.)
_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(?P<pid>\d+)-(?P<start>\d+)(?:-\d+)?$")
_OWNED_RE = re.compile(rf"^topiary-(?:{'|'.join(TEMP_KINDS)})-(?P<pid>\d+)-(?P<start>\d+)-")
_PROC_STAT = Path("/proc/self/stat")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def start_time(pid: int) -> int | None:
    """A process's start time in centiseconds since boot; None when it does not exist.

    Since boot, not since the epoch: an epoch start time is the kernel's boot time plus the
    process's clock ticks, and that boot time moves whenever the wall clock is stepped (NTP,
    a virtual machine resumed from a snapshot). A live process then no longer matched the
    start its own temporary names carry, and the next clean-up took it for dead.
    """
    if not _PROC_STAT.exists():  # no procfs (macOS): psutil's epoch time, clock steps and all
        return _psutil_start_time(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat.rpartition(b")")[2].split()  # the name, in parentheses, may hold spaces
    if fields[0] in (b"Z", b"X"):  # a zombie has ended
        return None
    return int(fields[19]) * 100 // _CLOCK_TICKS  # field 22 of proc(5): starttime, in ticks


def _psutil_start_time(pid: int) -> int | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(proc.create_time() * 100)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@functools.lru_cache(maxsize=1)
def _own_start() -> int:
    return start_time(os.getpid()) or 0


def owner_id() -> str:
    """This process as ``<pid>-<start>``, with its start time in centiseconds since boot."""
    return f"{os.getpid()}-{_own_start()}"


def owner_tag() -> str:
    """This process as ``<host>/<pid>-<start>`` (what an MLflow run records as its owner)."""
    return f"{socket.gethostname()}/{owner_id()}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (``""``: on every interface, for other machines to reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def owner_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` (started at ``start`` centiseconds after boot, if known) runs.

    Start times are compared within a second (psutil's epoch times, where there is no
    procfs, drift a little); a pid is not re-used that fast.
    """
    now = start_time(pid)
    if now is None:
        return False
    return start is None or abs(now - start) <= 100


def tag_alive(tag: str) -> bool:
    """Whether the owner named by :func:`owner_tag` runs; an owner on another host counts as alive."""
    host, _, ident = tag.rpartition("/")
    match = re.fullmatch(r"(\d+)-(\d+)", ident)
    if host != socket.gethostname() or not match:
        return True
    return owner_alive(int(match.group(1)), int(match.group(2)))


def temp_sibling(final: Path) -> Path:
    """A temporary sibling of ``final`` named after this process and thread."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.tmp-{owner_id()}-{threading.get_ident()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_atomic(tmp: Path, final: Path) -> Path:
    """Move a finished file or folder ``tmp`` to ``final``, replacing an old one.

    Readers see either the old artefact or the complete new one, never half of one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        trash = final.with_name(f".{final.name}.old-{owner_id()}-{threading.get_ident()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` to build an artefact in; renamed to ``final`` on success.

    On an exception the temporary file or folder is removed; after a kill, the next
    start's :func:`remove_stale` removes it.
    """
    tmp = temp_sibling(final)
    try:
        yield tmp
    except OSError as err:
        _remove(tmp)
        if err.filename is None or err.errno == errno.ENOSPC:  # name what was being written
            raise OSError(err.errno, err.strerror or str(err), str(final)) from err
        raise
    except BaseException:
        _remove(tmp)
        raise
    replace_atomic(tmp, final)


def write_file(path: Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write a small file atomically (text or bytes)."""
    with building(Path(path)) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)
    return Path(path)


def temp_prefix(kind: str) -> str:
    """The ``tempfile`` prefix of a ``kind`` folder of this process in ``$TMPDIR``, found again
    by :func:`remove_stale` once this process is dead (``kind`` one of :data:`TEMP_KINDS`)."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"temp_prefix: kind {kind!r} is not one of {TEMP_KINDS}")
    return f"topiary-{kind}-{owner_id()}-"


def _stale(name: str, pattern: re.Pattern) -> bool:
    match = pattern.match(name)
    if not match:
        return False
    return not owner_alive(int(match.group("pid")), int(match.group("start")))


def remove_stale(folders: Iterable[Path], depth: int = 1, tmp_dir: Path | None = None) -> list[Path]:
    """Remove temporary entries of dead processes; returns what was removed.

    Args:
        folders: where artefacts are renamed into place; their entries, and (``depth`` 2)
            those of their sub-folders, are checked.
        depth: 1 checks the folders' own entries, 2 also one level below.
        tmp_dir: also remove the :func:`temp_prefix` folders of dead owners here (``$TMPDIR``).
    """
    candidates: list[tuple[Path, re.Pattern]] = []
    for folder in folders:
        levels = [Path(folder)]
        for level in range(depth):
            entries = [p for parent in levels if parent.is_dir() for p in parent.iterdir()]
            candidates += [(p, _TEMP_RE) for p in entries]
            if level + 1 < depth:
                levels = [p for p in entries if not _TEMP_RE.match(p.name) and p.is_dir()]
    if tmp_dir is not None and Path(tmp_dir).is_dir():
        candidates += [(p, _OWNED_RE) for p in Path(tmp_dir).iterdir()]
    removed = []
    for path, pattern in candidates:
        if _stale(path.name, pattern):
            _remove(path)
            removed.append(path)
    return removed


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_MMAP_THRESHOLD = 32 << 20  # the highest threshold glibc's own adjustment reaches (64-bit)
_MAPPED = {"holders": 0}
_MAPPED_LOCK = threading.Lock()


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


@contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """While held, serve every allocation of ``threshold`` bytes or more from its own memory
    map (glibc); a context manager and a decorator.

    A streamed prune frees a block's tensors before it reads the next block's. With glibc's
    default, allocations under 32 MB come from the heap once a large one was freed, and the
    freed heap is not returned to the system: measured on a random LLaMA, the resident set
    grew by most of a block per block (4.6 GB at 12 blocks of 257 MB, 7.7 GB at 24). With a
    fixed threshold the memory of a freed block goes back at once and the resident set stays
    flat.

    After the last holder (threads of a sweep count), allocations under
    :data:`HEAP_MMAP_THRESHOLD` come from the heap again and the heap is trimmed only above
    twice that, as glibc's default ends up (it cannot be switched back to adjusting itself).
    Left mapped, every batch of an evaluation that follows in the same process (the
    pipeline's) maps and faults in its logits anew: 3.4 million page faults and 6 s of
    system time per zero-shot run of the embedded model.
    """
    with _MAPPED_LOCK:
        _MAPPED["holders"] += 1
        if _MAPPED["holders"] == 1:
            _mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        with _MAPPED_LOCK:
            _MAPPED["holders"] -= 1
            if _MAPPED["holders"] == 0:
                _mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
                _mallopt(M_TRIM_THRESHOLD, 2 * HEAP_MMAP_THRESHOLD)


_PAUSE_HITS: dict[str, int] = {}
_PR_SET_PDEATHSIG = 1


def pause_point(stage: str) -> None:
    """Test hook: stop here when ``TOPIARY_TEST_PAUSE_AT`` names ``stage`` (see the module docstring).

    ``<stage>@<n>`` stops at the ``n``-th time this process reaches ``stage`` (a middle block).
    """
    wanted, _, nth = os.environ.get(PAUSE_ENV, "").partition("@")
    if wanted != stage:
        return
    _PAUSE_HITS[stage] = _PAUSE_HITS.get(stage, 0) + 1
    if nth and _PAUSE_HITS[stage] != int(nth):
        return
    print(f"TOPIARY_PAUSED {stage} {os.getpid()}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """On Linux, have the kernel send ``sig`` to this process when its parent ends
    (``PR_SET_PDEATHSIG``; it fires when the parent's *thread* that started this process ends);
    exit at once when the parent is no longer ``parent`` (it died before the call).

    Used by the temporary Prefect server and by the DDP ranks Lightning starts (a rank that
    outlived a killed rank 0 would wait in a collective until its timeout under NCCL).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
