"""Run a module (or code) in this process and write its peak resident set to a file at exit.

``python -m benchmarks.peak_rss OUT -m MODULE ARGS...`` or ``... OUT -c CODE``. The figure
is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own address
space, which starts afresh at ``exec``. (``wait4``'s ``ru_maxrss`` does not: Linux carries
the parent's resident size at ``fork`` over the ``exec``, so a child of a 400 MB process
reports at least 400 MB.) It is written as bytes by an ``atexit`` hook, so it covers
everything up to the interpreter's exit, ``SystemExit`` included.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def vm_hwm() -> int:
    """This process's peak resident set in bytes (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def main() -> None:
    """Parse ``OUT (-m MODULE | -c CODE) ARGS...``, register the report, run the target."""
    if len(sys.argv) < 4 or sys.argv[2] not in ("-m", "-c"):
        raise SystemExit("usage: python -m benchmarks.peak_rss OUT (-m MODULE | -c CODE) [ARGS...]")
    out, mode, target = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    atexit.register(lambda: out.write_text(f"{vm_hwm()}\n"))
    sys.argv = [target, *sys.argv[4:]]
    if mode == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main()
