"""A per-user cache of the embedded corpus and its token ids, so a run does not rebuild them.

Building the corpus parses the whole standard library (seconds), and tokenising a split
of it takes about as long again; both depend only on the Python version (the standard
library's text), on the code of :mod:`modules.data.corpus` and, for the ids, on the
tokenizer. So they are built once and kept in :func:`cache_dir`:

- ``corpus-py<minor>-<builder>.json``: the splits, with the sha256 the builder gave them.
  ``<builder>`` is a hash of ``corpus.py``'s source, so a change to the builder is a
  new file, never a stale hit.
- ``ids-<corpus>-<split>-<tokenizer>.safetensors``: the token ids of one split joined by a
  blank line (tensor ``input_ids``), with the sha256 of those ids in its metadata.

Every file is written atomically (:func:`modules.process.write_file`) and checked when read:
a corpus whose content no longer hashes to its recorded sha256, or ids whose bytes do not
match theirs, or a file that does not parse, is rebuilt and replaced, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

from safetensors import safe_open

from modules.data import corpus as builder
from modules.data.corpus import SPLITS, Corpus, build_corpus, python_minor
from modules.process import write_file

CACHE_ENV = "TOPIARY_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder: ``$TOPIARY_CACHE_DIR``, else ``$XDG_CACHE_HOME/topiary`` or ``~/.cache/topiary``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "topiary"


@functools.lru_cache(maxsize=1)
def builder_hash() -> str:
    """sha256 of the corpus builder's source: what, with the Python version, determines the corpus."""
    return hashlib.sha256(Path(builder.__file__).read_bytes()).hexdigest()


def corpus_file() -> Path:
    """The cache file of this Python version's corpus."""
    return cache_dir() / f"corpus-py{python_minor()}-{builder_hash()[:16]}.json"


def _warn(message: str) -> None:
    print(f"topiary: {message}", file=sys.stderr)


def _read_corpus(path: Path) -> tuple[Corpus, str] | None:
    """The corpus in ``path`` and its sha256, or None when it is missing, unreadable or altered."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["python"] != python_minor() or record["builder"] != builder_hash():
            return None
        corpus = Corpus(**{split: list(record["splits"][split]) for split in SPLITS})
        if not all(isinstance(doc, str) for split in SPLITS for doc in getattr(corpus, split)):
            return None
        recorded = record["sha256"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        _warn(f"the corpus cache {path} is unreadable ({type(err).__name__}); rebuilding it")
        return None
    if corpus.sha256() != recorded:
        _warn(f"the corpus cache {path} does not match its recorded sha256; rebuilding it")
        return None
    return corpus, recorded


def load_corpus() -> tuple[Corpus, str]:
    """The embedded corpus and its sha256: from the cache when it is valid, else built and cached.

    A cache that cannot be written (a read-only home) only costs the rebuild next time.
    """
    path = corpus_file()
    found = _read_corpus(path)
    if found is not None:
        return found
    corpus = build_corpus()
    sha = corpus.sha256()
    record = {
        "python": python_minor(),
        "builder": builder_hash(),
        "sha256": sha,
        "splits": {split: getattr(corpus, split) for split in SPLITS},
    }
    try:
        write_file(path, json.dumps(record))
    except OSError as err:
        _warn(f"cannot write the corpus cache {path} ({err.strerror or err}); it is rebuilt next time")
    return corpus, sha


def tokenizer_hash(tokenizer) -> str | None:
    """sha256 of what decides a tokenizer's ids: its class, settings and (fast) vocabulary and rules.

    None for a tokenizer without a serialisable backend (a slow one): its ids are not cached.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    h.update(backend.to_str().encode())
    h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def ids_file(corpus_sha: str, split: str, tok_hash: str) -> Path:
    """The cache file of one split's token ids under one tokenizer."""
    return cache_dir() / f"ids-{corpus_sha[:16]}-{split}-{tok_hash[:16]}.safetensors"


def _ids_sha(ids) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def _read_ids(path: Path, corpus_sha: str, tok_hash: str):
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids = f.get_tensor("input_ids")
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        _warn(f"the token cache {path} is unreadable ({type(err).__name__}); rebuilding it")
        return None
    if (
        meta.get("corpus") != corpus_sha
        or meta.get("tokenizer") != tok_hash
        or meta.get("sha256") != _ids_sha(ids)
    ):
        _warn(f"the token cache {path} does not match its recorded sha256; rebuilding it")
        return None
    return ids


def split_ids(corpus: Corpus, corpus_sha: str, split: str, tokenizer, encode):
    """Token ids of the corpus split ``split`` joined by a blank line, cached per tokenizer.

    Args:
        corpus: the corpus (:func:`load_corpus`).
        corpus_sha: its sha256, part of the cache key.
        split: ``train``, ``validation`` or ``test``.
        tokenizer: the tokenizer the ids are for.
        encode: ``(tokenizer, text) -> LongTensor``, the encoding the caller would do itself.
    """
    tok_hash = tokenizer_hash(tokenizer)
    if tok_hash is None:
        return encode(tokenizer, corpus.text(split))
    path = ids_file(corpus_sha, split, tok_hash)
    ids = _read_ids(path, corpus_sha, tok_hash)
    if ids is not None:
        return ids
    ids = encode(tokenizer, corpus.text(split))
    from safetensors.torch import save  # imports torch: the cache's paths alone (preflight) need none

    meta = {"corpus": corpus_sha, "tokenizer": tok_hash, "sha256": _ids_sha(ids)}
    try:
        write_file(path, save({"input_ids": ids.contiguous()}, metadata=meta))
    except OSError as err:
        _warn(f"cannot write the token cache {path} ({err.strerror or err}); it is rebuilt next time")
    return ids
