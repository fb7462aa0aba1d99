"""The embedded corpus is the same in every process, matches its recorded hash, and round-trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modules.data.corpus import SPLITS, build_corpus, python_minor
from modules.reference.train import REFERENCE_DIR, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "modules" / "assets" / "corpus.json"

# Text a byte-level BPE must give back unchanged: accents, CJK, emoji, tabs, runs of
# spaces and newlines, leading and trailing blanks, the special token's spelling.
AWKWARD = [
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\n\n\n",
    "naïve café, Straße, ÆØÅ, ĳ, ﬁ",
    "日本語のテキストと中文文本",
    "emoji 🙂👍🏽 and math ∑ x² ≤ ∞",
    "zero\u200bwidth and non\u00a0breaking",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|endoftext|> is only text here",
    "",
]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def small_tokenizer(corpus, tmp_path_factory):
    """A tiny BPE trained like the reference one, saved and loaded back as users load it."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus.train[:300], vocab_size=512).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def other_process():
    """Build the corpus in a child with another hash seed, running while this process builds."""
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    code = "from modules.data.corpus import build_corpus; print(build_corpus().sha256())"
    env = {**os.environ, "PYTHONHASHSEED": seed}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield child
    child.kill()
    child.communicate()


def test_corpus_is_the_same_under_another_hash_seed(other_process, corpus):
    out, err = other_process.communicate(timeout=300)
    assert other_process.returncode == 0, err
    assert out.strip() == corpus.sha256()


def test_corpus_matches_recorded_hash(corpus):
    recorded = json.loads(RECORDED.read_text())
    if recorded["python"] != python_minor():
        pytest.skip(f"corpus hash recorded for Python {recorded['python']}, running {python_minor()}")
    assert corpus.sha256() == recorded["sha256"], (
        f"the embedded corpus changed (recorded with Python {recorded.get('recorded_with')}, "
        f"running {sys.version.split()[0]}); the reference model was trained on the recorded one"
    )


def test_splits_are_filled_and_joined_by_blank_lines(corpus):
    for split in SPLITS:
        docs = getattr(corpus, split)
        assert docs, split
        assert corpus.text(split) == "\n\n".join(docs)
    assert len(corpus.train) > 10 * len(corpus.test)  # about 90 / 5 / 5 by module


def test_small_tokenizer_round_trip(corpus, small_tokenizer):
    for text in corpus.test[:50] + AWKWARD:
        ids = small_tokenizer(text)["input_ids"]
        assert small_tokenizer.decode(ids) == text


@pytest.mark.skipif(not (REFERENCE_DIR / "tokenizer.json").exists(), reason="reference tokenizer not built")
def test_reference_tokenizer_round_trip(corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    for text in corpus.test[:50] + AWKWARD:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_the_real_corpus_round_trips_through_the_cache(corpus, tmp_path, monkeypatch):
    import modules.data.cache as cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cache, "build_corpus", lambda: corpus)  # built once by the fixture
    cache.load_corpus()
    monkeypatch.setattr(cache, "build_corpus", lambda: pytest.fail("a valid cache was rebuilt"))
    cached, sha = cache.load_corpus()
    assert cached == corpus and sha == corpus.sha256()
