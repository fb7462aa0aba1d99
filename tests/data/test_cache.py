"""The corpus and token cache: built once, reused, keyed, and rebuilt when damaged.

A stand-in corpus keeps these fast (the builder is wrapped to count its calls); the real
corpus's round trip through the cache is checked in ``test_corpus.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

import modules.data.cache as cache
import modules.data.windows as windows
from modules.data.corpus import Corpus
from modules.engine.names import REFERENCE_DIR

SMALL = Corpus(
    train=["The first training document, long enough to matter.", "naïve café, Straße, 日本語"],
    validation=["A validation document."],
    test=["A test document with a few words.", "And another one."],
)


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """An empty cache folder; ``build_corpus`` gives the stand-in and counts its calls."""
    calls = []

    def build() -> Corpus:
        calls.append(1)
        return SMALL

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "build_corpus", build)
    windows._cached_corpus.cache_clear()
    yield calls
    windows._cached_corpus.cache_clear()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(REFERENCE_DIR)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "topiary"


def test_corpus_is_built_once_then_read(builds):
    first, sha = cache.load_corpus()
    assert builds == [1] and sha == SMALL.sha256()
    assert cache.corpus_file().is_file() and not list(cache.cache_dir().glob(".*tmp*"))
    again, sha2 = cache.load_corpus()
    assert builds == [1], "a valid cache was rebuilt"
    assert again == SMALL and sha2 == sha


def test_the_file_name_carries_python_and_builder(builds):
    name = cache.corpus_file().name
    assert cache.python_minor() in name and cache.builder_hash()[:16] in name


@pytest.mark.parametrize(
    "damage",
    ["truncate", "edit_text", "other_python", "other_builder", "not_json_object"],
)
def test_a_damaged_or_foreign_corpus_cache_is_rebuilt(builds, damage, capsys):
    cache.load_corpus()
    path = cache.corpus_file()
    record = json.loads(path.read_text())
    if damage == "truncate":
        path.write_text(path.read_text()[:-40])
    elif damage == "edit_text":  # valid JSON, recorded hash kept: only the hash check finds it
        record["splits"]["train"][0] = "The first training document, long enough to matteR."
        path.write_text(json.dumps(record))
    elif damage == "other_python":
        record["python"] = "2.7"
        path.write_text(json.dumps(record))
    elif damage == "other_builder":
        record["builder"] = "0" * 64
        path.write_text(json.dumps(record))
    else:
        path.write_text("[1, 2, 3]")
    corpus, sha = cache.load_corpus()
    assert builds == [1, 1], f"{damage}: the cache was trusted"
    assert corpus == SMALL and sha == SMALL.sha256()
    assert cache._read_corpus(path) is not None, "the rebuilt cache was not written back"


def test_fingerprint_reads_the_cache_without_building(builds):
    cache.load_corpus()
    windows._cached_corpus.cache_clear()
    fingerprint = windows.data_fingerprint("embedded")
    assert builds == [1], "the fingerprint rebuilt the corpus although the cache is valid"
    assert fingerprint != windows.data_fingerprint("embedded-validation")
    edited = Corpus(train=["other"], validation=SMALL.validation, test=SMALL.test)
    path = cache.corpus_file()
    record = json.loads(path.read_text())
    record["splits"]["train"], record["sha256"] = edited.train, edited.sha256()
    path.write_text(json.dumps(record))
    windows._cached_corpus.cache_clear()
    assert windows.data_fingerprint("embedded") != fingerprint, "the fingerprint ignores the corpus"


def encode_counted(calls: list):
    def encode(tokenizer, text: str) -> torch.Tensor:
        calls.append(text)
        return windows._encode(tokenizer, text)

    return encode


def test_token_ids_are_cached_per_split_and_tokenizer(builds, tok):
    corpus, sha = cache.load_corpus()
    calls: list = []
    encode = encode_counted(calls)
    direct = windows._encode(tok, SMALL.text("train"))
    first = cache.split_ids(corpus, sha, "train", tok, encode)
    again = cache.split_ids(corpus, sha, "train", tok, encode)
    assert len(calls) == 1 and torch.equal(first, direct) and torch.equal(again, direct)
    assert again.dtype == torch.long
    test = cache.split_ids(corpus, sha, "test", tok, encode)
    assert len(calls) == 2 and torch.equal(test, windows._encode(tok, SMALL.text("test")))
    other = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    other.add_tokens(["zzqq"])
    assert cache.tokenizer_hash(other) != cache.tokenizer_hash(tok)


@pytest.mark.parametrize("damage", ["flip_id", "truncate"])
def test_damaged_token_ids_are_rebuilt(builds, tok, damage):
    corpus, sha = cache.load_corpus()
    calls: list = []
    encode = encode_counted(calls)
    direct = cache.split_ids(corpus, sha, "train", tok, encode)
    path = cache.ids_file(sha, "train", cache.tokenizer_hash(tok))
    data = bytearray(path.read_bytes())
    if damage == "flip_id":
        data[-3] ^= 0x01  # one id's byte, the header intact
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))
    ids = cache.split_ids(corpus, sha, "train", tok, encode)
    assert len(calls) == 2, f"{damage}: damaged ids were trusted"
    assert torch.equal(ids, direct)


def test_windows_use_the_cached_ids(builds, tok):
    first = windows.calibration_windows("embedded", tok, nsamples=3, seqlen=4, seed=0)
    ev = windows.eval_windows("embedded", tok, 4)
    assert len(list(cache.cache_dir().glob("ids-*"))) == 2
    windows._cached_corpus.cache_clear()
    assert torch.equal(windows.calibration_windows("embedded", tok, nsamples=3, seqlen=4, seed=0), first)
    assert torch.equal(windows.eval_windows("embedded", tok, 4), ev)
    assert builds == [1]
