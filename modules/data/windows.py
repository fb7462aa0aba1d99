"""Calibration and evaluation token windows, from every data source Topiary accepts.

A source is a string:

- ``embedded``: the corpus of :mod:`modules.data.corpus` (calibration: train split;
  evaluation: test split). ``embedded-validation`` evaluates on its validation split
  (the split the reference model's training figures are reported on).
- ``c4``: allenai/c4, config ``en`` (calibration: first training shard; evaluation:
  first validation shard).
- ``wikitext2``: wikitext-2-raw-v1 (calibration: train split; evaluation: test split).
- a path ending in ``.txt`` (one document) or ``.jsonl`` (one document per line, field
  ``text``): used for calibration and evaluation alike.
- a path ending in ``.safetensors`` or ``.pt`` holding an integer tensor ``input_ids`` of
  shape (n, seqlen): ready-made windows, returned as they are (exact reproduction).

Hub data sets are read with ``datasets.load_dataset(location, data_files=...)``, where
``location`` is the Hub repository or, when ``data_dir`` or the environment variable
(``TOPIARY_C4_DIR``, ``TOPIARY_WIKITEXT2_DIR``) names one, a local folder holding the same
files under the same names. Offline, a Hub source without a local copy ends in one
:class:`TopiaryError` that says how to supply one.

Text is tokenised with the tokenizer's defaults (special tokens included, as the
SparseGPT and Wanda reference code does).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from modules.data.cache import load_corpus, split_ids
from modules.errors import TopiaryError

NAMED_SOURCES = ("embedded", "embedded-validation", "c4", "wikitext2")
TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".safetensors", ".pt")
# The reference C4 evaluation (SparseGPT, Wanda): the first 1100 validation documents
# joined by a space, at most 256 windows. Kept so C4 figures compare with the papers'.
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
_OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows of ``seqlen``; drop the remainder.

    ``ids`` may be 1-D or shaped (1, N), as a tokenizer's ``return_tensors="pt"`` gives.
    """
    ids = ids.reshape(-1)
    if seqlen < 2:
        raise TopiaryError(f"{seqlen} is too short (need at least 2 tokens per window)", key="seqlen")
    n = ids.numel() // seqlen
    if n == 0:
        raise TopiaryError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}", key="seqlen"
        )
    return ids[: n * seqlen].view(n, seqlen)


@dataclass(frozen=True)
class HubSource:
    """A Hub data set: its repository, the file read for each purpose, the override variable."""

    repo: str
    env: str
    files: dict[str, tuple[str, str]]  # purpose -> (split name, file path in the repository)


HUB_SOURCES = {
    "c4": HubSource(
        repo="allenai/c4",
        env="TOPIARY_C4_DIR",
        files={
            "calibration": ("train", "en/c4-train.00000-of-01024.json.gz"),
            "evaluation": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
        },
    ),
    "wikitext2": HubSource(
        repo="Salesforce/wikitext",
        env="TOPIARY_WIKITEXT2_DIR",
        files={
            "calibration": ("train", "wikitext-2-raw-v1/train-00000-of-00001.parquet"),
            "evaluation": ("test", "wikitext-2-raw-v1/test-00000-of-00001.parquet"),
        },
    ),
}


def source_kind(source: str) -> str:
    """Classify a source: ``embedded``, ``c4``, ``wikitext2``, ``text`` or ``tokens``.

    Raises:
        TopiaryError: an unknown name, a file with another extension, or a missing file.
    """
    if source in NAMED_SOURCES:
        return source
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES:
        raise TopiaryError(
            f"{source!r} is not one of {', '.join(NAMED_SOURCES)} "
            f"nor a file ending in {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)}",
            key="data source",
        )
    if not path.is_file():
        raise TopiaryError(f"file {source!r} does not exist", key="data source")
    return "text" if suffix in TEXT_SUFFIXES else "tokens"


def calibration_windows(
    source: str,
    tokenizer,
    nsamples: int | None,
    seqlen: int | None,
    seed: int,
    max_context: int | None = None,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """Random calibration windows, the SparseGPT/Wanda way, under a seeded generator.

    ``c4``: pick a random document with more than ``seqlen`` tokens, then a random window
    in it (the reference code's sampling). Any other text source: the documents joined
    by a blank line and tokenised once, then random start offsets into that stream.

    A token file is returned as it is. ``nsamples`` and ``seqlen`` may be None to accept
    its shape; when given they must match it exactly (no silent truncation, so a config
    always states the data it ran on).

    Args:
        source: see the module docstring.
        tokenizer: a Hugging Face tokenizer (may be None for a token file).
        nsamples: number of windows (at least 1).
        seqlen: tokens per window (at least 2, at most ``max_context``).
        seed: seed of the ``torch.Generator`` that draws documents and offsets.
        max_context: the model's context (``config.max_position_embeddings``), if known.
        data_dir: local copy of a Hub data set (overrides the environment variable).

    Returns:
        LongTensor of shape (nsamples, seqlen).
    """
    kind = source_kind(source)
    if kind == "tokens":
        return _token_file(source, nsamples, seqlen, max_context, tokenizer)
    _check_nsamples(nsamples)
    _check_seqlen(seqlen, max_context)
    gen = torch.Generator().manual_seed(seed)
    if kind == "c4":
        docs = load_documents(source, "calibration", data_dir)
        return _document_windows(docs, tokenizer, nsamples, seqlen, gen, source)
    ids = _joined_ids(source, "calibration", tokenizer, data_dir)
    if ids.numel() < seqlen:
        raise TopiaryError(
            f"{source!r} has {ids.numel()} tokens for calibration, fewer than one window of seqlen {seqlen}",
            key="data source",
        )
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(
    source: str,
    tokenizer,
    seqlen: int | None,
    max_context: int | None = None,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """Evaluation windows by the WikiText-2 protocol of ALGORITHMS.md.

    Documents joined with a blank line, tokenised once, cut into non-overlapping windows
    of ``seqlen`` tokens, remainder dropped. ``c4`` follows the reference C4 protocol
    instead (first 1100 validation documents joined by a space, at most 256 windows). A
    token file is returned as it is (``seqlen`` None, or equal to its width).

    Args:
        source: see the module docstring.
        tokenizer: a Hugging Face tokenizer (may be None for a token file).
        seqlen: tokens per window (at least 2, at most ``max_context``).
        max_context: the model's context (``config.max_position_embeddings``), if known.
        data_dir: local copy of a Hub data set (overrides the environment variable).

    Returns:
        LongTensor of shape (n, seqlen).
    """
    kind = source_kind(source)
    if kind == "tokens":
        return _token_file(source, None, seqlen, max_context, tokenizer)
    _check_seqlen(seqlen, max_context)
    if kind == "c4":
        docs = load_documents(source, "evaluation", data_dir)
        ids = _encode(tokenizer, " ".join(docs[:C4_EVAL_DOCS]))
    else:
        ids = _joined_ids(source, "evaluation", tokenizer, data_dir)
    if ids.numel() < seqlen:
        raise TopiaryError(
            f"{source!r} has {ids.numel()} tokens for evaluation, fewer than one window of seqlen {seqlen}",
            key="data source",
        )
    out = windows(ids, seqlen)
    return out[:C4_EVAL_WINDOWS] if kind == "c4" else out


def check_source(
    source: str,
    purpose: str,
    nsamples: int | None,
    seqlen: int | None,
    max_context: int | None = None,
    data_dir: str | Path | None = None,
) -> None:
    """Prove that ``source`` can give windows for ``purpose``, before any model work.

    Checks the file (exists; text is UTF-8 and, for ``.jsonl``, one JSON object with a
    ``text`` field per line; a token file has the requested shape), ``seqlen`` against
    the model's context and, for a Hub data set, that a local copy or the Hub (or the
    Hub cache, offline) can provide its file. Reads no model and downloads nothing.

    Raises:
        TopiaryError: naming the source or the setting.
    """
    kind = source_kind(source)
    if kind == "tokens":
        _token_file(source, nsamples if purpose == "calibration" else None, seqlen, max_context, None)
        return
    if purpose == "calibration":
        _check_nsamples(nsamples)
    _check_seqlen(seqlen, max_context)
    if kind == "text":
        _file_documents(Path(source))
    elif kind in HUB_SOURCES:
        _check_hub_file(kind, purpose, data_dir)


def _check_hub_file(name: str, purpose: str, data_dir: str | Path | None) -> None:
    """A Hub data set's file is in its local copy, or reachable (online, or in the Hub cache)."""
    hub = HUB_SOURCES[name]
    _, filename = hub.files[purpose]
    location = hub_location(name, data_dir)
    if location != hub.repo:
        if not (Path(location) / filename).is_file():
            raise TopiaryError(
                f"{name!r} local copy at {location} lacks {filename} "
                f"(expected the Hub's file names under {hub.env} or data_dir)",
                key="data source",
            )
        return
    offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
    if not offline:
        return
    from huggingface_hub import try_to_load_from_cache  # only offline, for a Hub source

    if isinstance(try_to_load_from_cache(hub.repo, filename, repo_type="dataset"), str):
        return
    raise TopiaryError(
        f"{name!r} ({hub.repo}, {filename}) is not reachable offline "
        f"({', '.join(f'{v}=1' for v in offline)}) and not in the Hub cache. "
        f"Point {hub.env} at a local copy with the same file names, "
        "or give a local .txt/.jsonl file as the data source",
        key="data source",
    )


def load_documents(source: str, purpose: str, data_dir: str | Path | None = None) -> Sequence[str]:
    """The documents of a text source for ``purpose`` (``calibration`` or ``evaluation``).

    Hub sources give a lazy column (C4's training shard holds ~356k documents, read one
    at a time by the sampler); the others a list.
    """
    if purpose not in ("calibration", "evaluation"):
        raise ValueError(f"purpose: {purpose!r} is not one of calibration, evaluation")
    kind = source_kind(source)
    if kind in ("embedded", "embedded-validation"):
        corpus = _corpus()
        held_out = corpus.validation if kind == "embedded-validation" else corpus.test
        return list(corpus.train if purpose == "calibration" else held_out)
    if kind in HUB_SOURCES:
        return _hub_documents(kind, purpose, data_dir)
    if kind == "text":
        return _file_documents(Path(source))
    raise TopiaryError(f"{source!r} holds token ids, not text", key="data source")


def hub_location(name: str, data_dir: str | Path | None = None) -> str:
    """Where a Hub data set is read from: ``data_dir``, else its variable, else the Hub."""
    hub = HUB_SOURCES[name]
    local = data_dir or os.environ.get(hub.env)
    return str(Path(local).expanduser().resolve()) if local else hub.repo


def data_fingerprint(source: str, data_dir: str | Path | None = None) -> str:
    """sha256 naming the data's content, for cache keys.

    Local files: their bytes. ``embedded``: the corpus hash. Hub sources: the repository
    and file names, or the bytes of those files when read from a local copy.
    """
    kind = source_kind(source)
    h = hashlib.sha256(kind.encode())
    if kind in ("embedded", "embedded-validation"):
        h.update(_corpus_sha().encode())
    elif kind in HUB_SOURCES:
        hub = HUB_SOURCES[kind]
        location = hub_location(kind, data_dir)
        h.update(hub.repo.encode())
        for purpose, (split, name) in sorted(hub.files.items()):
            h.update(f"{purpose}:{split}:{name}".encode())
            if location != hub.repo and (Path(location) / name).is_file():
                _hash_file(h, Path(location) / name)
    else:
        _hash_file(h, Path(source))
    return h.hexdigest()


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


@functools.lru_cache(maxsize=1)
def _cached_corpus():
    """The corpus and its sha256, once per process, from the per-user cache (:mod:`modules.data.cache`)."""
    return load_corpus()


def _corpus():
    return _cached_corpus()[0]


def _corpus_sha() -> str:
    corpus = _corpus()
    cached, sha = _cached_corpus()
    return sha if corpus is cached else corpus.sha256()


def _joined_ids(source: str, purpose: str, tokenizer, data_dir: str | Path | None) -> torch.Tensor:
    """The token ids of a text source's documents for ``purpose`` joined by a blank line.

    For the embedded corpus they come from the per-user token cache (built once per tokenizer).
    """
    kind = source_kind(source)
    if kind in ("embedded", "embedded-validation"):
        held_out = "validation" if kind == "embedded-validation" else "test"
        split = "train" if purpose == "calibration" else held_out
        return split_ids(_corpus(), _corpus_sha(), split, tokenizer, _encode)
    return _encode(tokenizer, "\n\n".join(load_documents(source, purpose, data_dir)))


def _check_nsamples(nsamples: int | None) -> None:
    if nsamples is None or nsamples < 1:
        raise TopiaryError(f"{nsamples} must be at least 1", key="nsamples")


def _check_seqlen(seqlen: int | None, max_context: int | None) -> None:
    if seqlen is None or seqlen < 2:
        raise TopiaryError(f"{seqlen} must be at least 2 (one input and one target token)", key="seqlen")
    if max_context is not None and seqlen > max_context:
        raise TopiaryError(
            f"{seqlen} is longer than the model's context of {max_context} tokens "
            "(config.max_position_embeddings); use a seqlen of at most that",
            key="seqlen",
        )


def _encode(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise TopiaryError("tokenizer: a text data source needs a tokenizer")
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def _document_windows(
    docs: Sequence[str], tokenizer, nsamples: int, seqlen: int, gen: torch.Generator, source: str
) -> torch.Tensor:
    """The reference C4 sampling: a random document longer than seqlen, a random window in it."""
    if not docs:
        raise TopiaryError(f"{source!r} has no documents", key="data source")
    short: set[int] = set()  # documents known to be too short, not tokenised again
    out = []
    for _ in range(nsamples):
        while True:
            if len(short) == len(docs):
                raise TopiaryError(
                    f"no document of {source!r} has more than seqlen {seqlen} tokens", key="data source"
                )
            i = int(torch.randint(len(docs), (1,), generator=gen))
            if i in short:
                continue
            ids = _encode(tokenizer, docs[i])
            if ids.numel() > seqlen:
                break
            short.add(i)
        start = int(torch.randint(ids.numel() - seqlen, (1,), generator=gen))
        out.append(ids[start : start + seqlen])
    return torch.stack(out)


def _hub_documents(name: str, purpose: str, data_dir: str | Path | None) -> Sequence[str]:
    """Read one file of a Hub data set through ``datasets.load_dataset``, local or remote."""
    import datasets  # heavy (pandas, pyarrow) and only for a Hub source

    hub = HUB_SOURCES[name]
    split, filename = hub.files[purpose]
    location = hub_location(name, data_dir)
    if location != hub.repo and not (Path(location) / filename).is_file():
        raise TopiaryError(
            f"{name!r} local copy at {location} lacks {filename} "
            f"(expected the Hub's file names under {hub.env} or data_dir)",
            key="data source",
        )
    try:
        ds = datasets.load_dataset(location, data_files={split: filename}, split=split)
    except Exception as err:  # the Hub's errors vary by version; turn all of them into one line
        if location != hub.repo:
            raise TopiaryError(
                f"cannot read {name!r} from {Path(location) / filename}: {type(err).__name__}: {err}",
                key="data source",
            ) from None
        offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        why = (
            f"offline ({', '.join(f'{v}=1' for v in offline)})" if offline else f"{type(err).__name__}: {err}"
        )
        raise TopiaryError(
            f"cannot load {name!r} ({hub.repo}, {filename}) from the Hub: {why}. "
            f"Point {hub.env} at a local copy with the same file names, "
            "or give a local .txt/.jsonl file as the data source",
            key="data source",
        ) from None
    if "text" not in ds.column_names:
        raise TopiaryError(
            f"{name!r} file {filename} has no 'text' column ({ds.column_names})", key="data source"
        )
    return ds["text"]


def _file_documents(path: Path) -> list[str]:
    """``.txt``: the whole file as one document. ``.jsonl``: field ``text`` of every line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TopiaryError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8",
            key="data source",
        ) from None
    if path.suffix.lower() == ".txt":
        return [text]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TopiaryError(f"{path} line {number} is not JSON ({err.msg})", key="data source") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise TopiaryError(f"{path} line {number} has no string field 'text'", key="data source")
        docs.append(row["text"])
    if not docs:
        raise TopiaryError(f"{path} has no documents", key="data source")
    return docs


def _token_file(
    source: str, nsamples: int | None, seqlen: int | None, max_context: int | None, tokenizer
) -> torch.Tensor:
    """Load ``input_ids`` (n, seqlen) from a token file and check it against the request."""
    path = Path(source)
    try:
        if path.suffix.lower() == ".safetensors":
            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TopiaryError(f"cannot read token file {source!r}: {err}", key="data source") from None
    ids = data.get("input_ids") if isinstance(data, dict) else data
    if not isinstance(ids, torch.Tensor):
        raise TopiaryError(f"token file {source!r} holds no tensor 'input_ids'", key="data source")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TopiaryError(
            f"token file {source!r} has dtype {ids.dtype}; token ids must be integers", key="data source"
        )
    if ids.ndim != 2 or ids.numel() == 0:
        raise TopiaryError(
            f"token file {source!r} has shape {tuple(ids.shape)}; expected (n, seqlen)", key="data source"
        )
    n, width = ids.shape
    if nsamples is not None and nsamples != n:
        raise TopiaryError(
            f"{nsamples} does not match token file {source!r}, which holds {n} windows; set nsamples to {n}",
            key="nsamples",
        )
    if seqlen is not None and seqlen != width:
        raise TopiaryError(
            f"{seqlen} does not match token file {source!r}, whose windows have {width} tokens; "
            f"set seqlen to {width}",
            key="seqlen",
        )
    _check_seqlen(width, max_context)
    ids = ids.long()
    vocab = len(tokenizer) if tokenizer is not None else None
    if int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab):
        raise TopiaryError(
            f"token file {source!r} has ids in [{int(ids.min())}, {int(ids.max())}], "
            f"outside the tokenizer's vocabulary [0, {vocab})",
            key="data source",
        )
    return ids
