"""What checking each checkpoint tensor as it is read costs: :func:`modules.engine.streaming.check_read`.

Writes one LLaMA-7B-shaped decoder block (q/k/v/o ``hidden x hidden``, gate/up/down
``hidden x intermediate``) as a safetensors file in a temporary folder, then reads every
tensor ``--repeats`` times the way :meth:`CheckpointReader.tensor` does (plain reads,
then a cast to ``--dtype``), with and without the finiteness check, alternating, and
prints the median seconds of one block of each and the check's share. The file is in the
page cache after the first read, so the read is as fast as it gets and the share is an
upper bound of the check's cost on a real disk. Run::

    python -m benchmarks.bench_read_check [--hidden 4096] [--intermediate 11008] [--stored bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from modules.engine.models import DTYPES
from modules.engine.streaming import check_read, read_header, read_tensor


def _write_block(folder: Path, hidden: int, intermediate: int, dtype: torch.dtype) -> Path:
    shapes = {f"self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"}
    shapes |= {"mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden)}
    shapes |= {"mlp.down_proj.weight": (hidden, intermediate)}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items()}
    path = folder / "block.safetensors"
    save_file(tensors, path)
    return path


def _read_block(path: Path, dtype: torch.dtype, check: bool) -> float:
    header, _, start = read_header(path)
    t = time.perf_counter()
    with open(path, "rb") as f:
        for key, info in header.items():
            stored = read_tensor(f, start, info, key)
            cast = stored.to(dtype=dtype)
            if check:
                check_read(key, path, stored, cast)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--stored", choices=list(DTYPES), default="bfloat16", help="the checkpoint's dtype")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the dtype it is read into")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_block(Path(tmp), args.hidden, args.intermediate, DTYPES[args.stored])
        size = path.stat().st_size
        _read_block(path, DTYPES[args.dtype], False)  # into the page cache
        plain, checked = [], []
        for _ in range(args.repeats):
            plain.append(_read_block(path, DTYPES[args.dtype], False))
            checked.append(_read_block(path, DTYPES[args.dtype], True))
    a, b = statistics.median(plain), statistics.median(checked)
    print(
        f"one block ({size / 1e6:.0f} MB, stored {args.stored}, read into {args.dtype}, "
        f"{torch.get_num_threads()} threads): read {a:.3f} s, read + check {b:.3f} s, "
        f"check {b - a:+.3f} s ({(b - a) / a:+.1%} of the read; median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
