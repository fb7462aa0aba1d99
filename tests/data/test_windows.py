"""Every data source on local fixtures in the Hub's schemas; windowing; every bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import modules.data.windows as data
from modules.data.corpus import Corpus
from modules.data.windows import calibration_windows, data_fingerprint, eval_windows, load_documents, windows
from modules.errors import TopiaryError
from modules.reference.train import train_tokenizer

FIX = Path(__file__).parents[1] / "fixtures" / "data"
C4_DIR = FIX / "c4"
WIKI_DIR = FIX / "wikitext"
TXT = FIX / "sample.txt"
JSONL = FIX / "sample.jsonl"
SAFETENSORS = FIX / "tokens.safetensors"
PT = FIX / "tokens.pt"
SEQLEN = 16


def read_c4(name: str) -> list[str]:
    with gzip.open(C4_DIR / "en" / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def read_wikitext(split: str) -> list[str]:
    return pq.read_table(WIKI_DIR / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")[
        "text"
    ].to_pylist()


def read_jsonl() -> list[str]:
    return [json.loads(line)["text"] for line in JSONL.read_text(encoding="utf-8").splitlines()]


# The documents each source should yield, read here without `datasets`.
EXPECTED_DOCS = {
    "c4": (
        lambda: read_c4("c4-train.00000-of-01024.json.gz"),
        lambda: read_c4("c4-validation.00000-of-00008.json.gz"),
    ),
    "wikitext2": (lambda: read_wikitext("train"), lambda: read_wikitext("test")),
    str(TXT): (lambda: [TXT.read_text(encoding="utf-8")],) * 2,
    str(JSONL): (read_jsonl,) * 2,
}
TEXT_SOURCES = list(EXPECTED_DOCS)


def short(source: str) -> str:
    """Test ids: the file name, not the whole path."""
    return Path(source).name


@pytest.fixture(scope="session")
def tok():
    """A tiny byte-level BPE trained on the fixtures: independent of the reference model."""
    docs = [d for fns in EXPECTED_DOCS.values() for fn in fns for d in fn()]
    return train_tokenizer(docs, vocab_size=300)


@pytest.fixture(autouse=True)
def local_hub(monkeypatch):
    """Point the Hub sources at the fixture copies; tests that want the Hub remove these."""
    monkeypatch.setenv("TOPIARY_C4_DIR", str(C4_DIR))
    monkeypatch.setenv("TOPIARY_WIKITEXT2_DIR", str(WIKI_DIR))


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text)["input_ids"])


def is_slice_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    if stream.numel() < window.numel():
        return False
    return bool((stream.unfold(0, window.numel(), 1) == window).all(dim=1).any())


# --- sources ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", TEXT_SOURCES, ids=short)
@pytest.mark.parametrize("purpose", ["calibration", "evaluation"])
def test_documents_of_every_text_source(source, purpose):
    expected = EXPECTED_DOCS[source][purpose == "evaluation"]()
    assert list(load_documents(source, purpose)) == expected


def test_local_copy_location_argument_wins_over_variable(tmp_path, monkeypatch):
    assert data.hub_location("c4") == str(C4_DIR.resolve())
    assert data.hub_location("c4", data_dir=tmp_path) == str(tmp_path.resolve())
    monkeypatch.delenv("TOPIARY_C4_DIR")
    assert data.hub_location("c4") == "allenai/c4"
    shutil.copytree(C4_DIR, tmp_path / "copy")
    docs = load_documents("c4", "calibration", data_dir=tmp_path / "copy")
    assert list(docs) == read_c4("c4-train.00000-of-01024.json.gz")


@pytest.mark.parametrize("source", ["wikitext2", str(TXT), str(JSONL)], ids=short)
def test_eval_windows_follow_the_wikitext2_protocol(tok, source):
    stream = encode(tok, "\n\n".join(EXPECTED_DOCS[source][1]()))
    out = eval_windows(source, tok, SEQLEN)
    n = stream.numel() // SEQLEN
    assert out.dtype == torch.long and out.shape == (n, SEQLEN)
    assert torch.equal(out.flatten(), stream[: n * SEQLEN])  # in order, no overlap, no gap
    assert 0 <= stream.numel() - out.numel() < SEQLEN  # only the remainder is dropped


def test_c4_eval_follows_the_reference_c4_protocol(tok, monkeypatch):
    docs = read_c4("c4-validation.00000-of-00008.json.gz")
    monkeypatch.setattr(data, "C4_EVAL_DOCS", 3)
    stream = encode(tok, " ".join(docs[:3]))
    out = eval_windows("c4", tok, SEQLEN)
    assert torch.equal(out.flatten(), stream[: out.numel()])
    assert out.shape[0] == stream.numel() // SEQLEN
    monkeypatch.setattr(data, "C4_EVAL_WINDOWS", 2)
    assert torch.equal(eval_windows("c4", tok, SEQLEN), out[:2])


@pytest.mark.parametrize("source", ["wikitext2", str(TXT), str(JSONL)], ids=short)
def test_calibration_windows_are_random_slices_of_the_stream(tok, source):
    stream = encode(tok, "\n\n".join(EXPECTED_DOCS[source][0]()))
    out = calibration_windows(source, tok, nsamples=6, seqlen=SEQLEN, seed=0)
    assert out.dtype == torch.long and out.shape == (6, SEQLEN)
    assert all(is_slice_of(w, stream) for w in out)
    assert len({tuple(w.tolist()) for w in out}) > 1


def test_c4_calibration_samples_documents_longer_than_seqlen(tok):
    docs = read_c4("c4-train.00000-of-01024.json.gz")
    encoded = [encode(tok, d) for d in docs]
    seqlen = 40
    long_docs = [ids for ids in encoded if ids.numel() > seqlen]
    assert 0 < len(long_docs) < len(docs)  # the fixture has both kinds
    out = calibration_windows("c4", tok, nsamples=8, seqlen=seqlen, seed=3)
    assert out.shape == (8, seqlen)
    for w in out:  # each window lies inside one long-enough document
        assert any(is_slice_of(w, ids) for ids in long_docs)


@pytest.mark.parametrize("source", TEXT_SOURCES, ids=short)
def test_calibration_is_deterministic_under_a_seed(tok, source):
    a = calibration_windows(source, tok, nsamples=4, seqlen=SEQLEN, seed=0)
    b = calibration_windows(source, tok, nsamples=4, seqlen=SEQLEN, seed=0)
    c = calibration_windows(source, tok, nsamples=4, seqlen=SEQLEN, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_embedded_uses_train_for_calibration_and_test_for_evaluation(tok, monkeypatch):
    # A stand-in corpus keeps this fast; the real one is checked below on its test split.
    train = read_jsonl() + read_c4("c4-train.00000-of-01024.json.gz")
    small = Corpus(train=train, validation=["validation only"], test=read_wikitext("test"))
    monkeypatch.setattr(data, "_corpus", lambda: small)
    calib = calibration_windows("embedded", tok, nsamples=5, seqlen=SEQLEN, seed=0)
    assert all(is_slice_of(w, encode(tok, small.text("train"))) for w in calib)
    ev = eval_windows("embedded", tok, SEQLEN)
    assert torch.equal(ev, windows(encode(tok, small.text("test")), SEQLEN))
    val = eval_windows("embedded-validation", tok, 2)
    assert torch.equal(val, windows(encode(tok, small.text("validation")), 2))


def test_embedded_eval_on_the_real_corpus(tok):
    corpus = data._corpus()
    stream = encode(tok, corpus.text("test"))
    out = eval_windows("embedded", tok, 64)
    assert torch.equal(out.flatten(), stream[: out.numel()])
    fingerprint = data_fingerprint("embedded")
    assert len(fingerprint) == 64 and fingerprint == data_fingerprint("embedded")


# --- token files -----------------------------------------------------------------------


def test_token_files_are_returned_as_they_are(tok):
    from safetensors.torch import load_file

    st = load_file(SAFETENSORS)["input_ids"]
    pt = torch.load(PT, weights_only=True)["input_ids"]
    assert pt.dtype == torch.int32  # the fixture stores int32; windows come back as int64
    for source, ids in [(SAFETENSORS, st), (PT, pt)]:
        n, width = ids.shape
        for out in (
            calibration_windows(str(source), tok, nsamples=n, seqlen=width, seed=0),
            calibration_windows(str(source), None, nsamples=None, seqlen=None, seed=5),
            eval_windows(str(source), tok, width, max_context=width),
            eval_windows(str(source), None, None),
        ):
            assert out.dtype == torch.long and torch.equal(out, ids.long())


def test_bare_tensor_in_pt_file(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(torch.ones(2, 4, dtype=torch.int16), path)
    assert torch.equal(eval_windows(str(path), None, 4), torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"nsamples": 3, "seqlen": 16}, "nsamples: 3 does not match"),
        ({"nsamples": 4, "seqlen": 8}, "seqlen: 8 does not match"),
        ({"nsamples": 4, "seqlen": 16, "max_context": 8}, "longer than the model's context of 8"),
    ],
)
def test_token_file_shape_mismatch(kwargs, needle):
    with pytest.raises(TopiaryError, match=needle):
        calibration_windows(str(SAFETENSORS), None, seed=0, **kwargs)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"input_ids": torch.zeros(2, 4)}, "dtype torch.float32"),
        ({"input_ids": torch.zeros(2, 4, dtype=torch.bool)}, "dtype torch.bool"),
        ({"input_ids": torch.zeros(8, dtype=torch.long)}, r"shape \(8,\); expected \(n, seqlen\)"),
        ({"input_ids": torch.zeros(1, 2, 4, dtype=torch.long)}, r"shape \(1, 2, 4\)"),
        ({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, r"shape \(0, 4\)"),
        ({"tokens": torch.zeros(2, 4, dtype=torch.long)}, "no tensor 'input_ids'"),
        ({"input_ids": torch.full((2, 4), 300)}, r"outside the tokenizer's vocabulary \[0, 300\)"),
        ({"input_ids": torch.full((2, 4), -1)}, r"ids in \[-1, -1\]"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bad_token_files(tok, tmp_path, content, suffix, needle):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".safetensors":
        save_file(content, path)
    else:
        torch.save(content, path)
    with pytest.raises(TopiaryError, match=needle):
        eval_windows(str(path), tok, None)


def test_unreadable_token_file(tmp_path):
    for name in ("junk.safetensors", "junk.pt"):
        (tmp_path / name).write_bytes(b"not a tensor file")
        with pytest.raises(TopiaryError, match=f"cannot read token file .*{name}"):
            eval_windows(str(tmp_path / name), None, None)


# --- bad input -------------------------------------------------------------------------


def test_seqlen_longer_than_the_model_context(tok):
    with pytest.raises(TopiaryError, match=r"seqlen: 256 is longer than the model's context of 128"):
        calibration_windows(str(TXT), tok, nsamples=2, seqlen=256, seed=0, max_context=128)
    with pytest.raises(TopiaryError, match="max_position_embeddings"):
        eval_windows(str(TXT), tok, 256, max_context=128)
    assert eval_windows(str(TXT), tok, 16, max_context=16).shape[1] == 16  # equal is allowed


@pytest.mark.parametrize("nsamples", [0, -3, None])
def test_nsamples_below_one(tok, nsamples):
    with pytest.raises(TopiaryError, match=f"nsamples: {nsamples} must be at least 1"):
        calibration_windows(str(TXT), tok, nsamples=nsamples, seqlen=SEQLEN, seed=0)


@pytest.mark.parametrize("seqlen", [1, 0, None])
def test_seqlen_below_two(tok, seqlen):
    with pytest.raises(TopiaryError, match=f"seqlen: {seqlen} must be at least 2"):
        calibration_windows(str(TXT), tok, nsamples=2, seqlen=seqlen, seed=0)
    with pytest.raises(TopiaryError, match=f"seqlen: {seqlen} must be at least 2"):
        eval_windows(str(TXT), tok, seqlen)


def test_file_too_short_for_one_window(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hi there", encoding="utf-8")
    n = encode(tok, "hi there").numel()
    with pytest.raises(
        TopiaryError, match=f"has {n} tokens for calibration, fewer than one window of seqlen 64"
    ):
        calibration_windows(str(path), tok, nsamples=2, seqlen=64, seed=0)
    with pytest.raises(
        TopiaryError, match=f"has {n} tokens for evaluation, fewer than one window of seqlen 64"
    ):
        eval_windows(str(path), tok, 64)
    assert calibration_windows(str(path), tok, nsamples=3, seqlen=n, seed=0).shape == (
        3,
        n,
    )  # exactly one fits


def test_c4_without_a_long_enough_document(tok):
    with pytest.raises(TopiaryError, match="no document of 'c4' has more than seqlen 5000 tokens"):
        calibration_windows("c4", tok, nsamples=1, seqlen=5000, seed=0)


def test_unknown_source_missing_file_wrong_extension(tok, tmp_path):
    with pytest.raises(
        TopiaryError,
        match=r"'c5' is not one of embedded, embedded-validation, c4, wikitext2 nor a file ending in \.txt",
    ):
        eval_windows("c5", tok, SEQLEN)
    with pytest.raises(TopiaryError, match="file '.*nope.jsonl' does not exist"):
        calibration_windows(str(tmp_path / "nope.jsonl"), tok, nsamples=2, seqlen=SEQLEN, seed=0)
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(TopiaryError, match=r"data.csv' is not one of .*\.safetensors, \.pt"):
        eval_windows(str(csv), tok, SEQLEN)
    with pytest.raises(TopiaryError, match="does not exist"):
        data_fingerprint(str(tmp_path / "gone.txt"))


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"text": "fine"}', '{"content": "no text here"}'], "line 2 has no string field 'text'"),
        (['{"text": 3}'], "line 1 has no string field 'text'"),
        (['["text"]'], "line 1 has no string field 'text'"),
        (['{"text": "fine"}', "", "{not json"], "line 3 is not JSON"),
        (["", "  "], "has no documents"),
    ],
)
def test_bad_jsonl(tok, tmp_path, lines, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TopiaryError, match=needle):
        eval_windows(str(path), tok, SEQLEN)


def test_text_source_needs_a_tokenizer():
    with pytest.raises(TopiaryError, match="needs a tokenizer"):
        eval_windows(str(TXT), None, SEQLEN)


def test_local_copy_missing_the_file(tok, tmp_path):
    with pytest.raises(TopiaryError, match="local copy at .* lacks en/c4-validation.00000-of-00008.json.gz"):
        eval_windows("c4", tok, SEQLEN, data_dir=tmp_path)


def test_corrupt_local_copy(tok, tmp_path):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "c4-train.00000-of-01024.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(TopiaryError, match=r"cannot read 'c4' from .*c4-train.00000-of-01024.json.gz: "):
        calibration_windows("c4", tok, nsamples=2, seqlen=SEQLEN, seed=0, data_dir=tmp_path)


@pytest.mark.parametrize(("name", "env"), [("c4", "TOPIARY_C4_DIR"), ("wikitext2", "TOPIARY_WIKITEXT2_DIR")])
def test_offline_hub_source_gives_one_clear_error(tok, monkeypatch, name, env):
    import datasets.config

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("datasets is online in this session (HF_DATASETS_OFFLINE unset when it was imported)")
    monkeypatch.delenv(env)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TopiaryError) as info:
        calibration_windows(name, tok, nsamples=2, seqlen=SEQLEN, seed=0)
    message = str(info.value)
    assert "\n" not in message
    for part in (f"cannot load {name!r}", "offline", "HF_DATASETS_OFFLINE=1", env, ".txt/.jsonl"):
        assert part in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


# --- fingerprints ----------------------------------------------------------------------


def test_fingerprint_follows_the_content(tmp_path, monkeypatch):
    copy = tmp_path / "sample.txt"
    shutil.copy(TXT, copy)
    assert data_fingerprint(str(copy)) == data_fingerprint(str(TXT))  # content, not the path
    copy.write_text(TXT.read_text(encoding="utf-8") + "one more line\n", encoding="utf-8")
    assert data_fingerprint(str(copy)) != data_fingerprint(str(TXT))
    prints = {
        data_fingerprint(s) for s in ["c4", "wikitext2", str(TXT), str(JSONL), str(SAFETENSORS), str(PT)]
    }
    assert len(prints) == 6

    local = data_fingerprint("c4")
    monkeypatch.delenv("TOPIARY_C4_DIR")
    hub = data_fingerprint("c4")
    assert hub != local and hub == data_fingerprint("c4")
    shutil.copytree(C4_DIR, tmp_path / "c4")
    assert data_fingerprint("c4", data_dir=tmp_path / "c4") == local
    with gzip.open(tmp_path / "c4/en/c4-train.00000-of-01024.json.gz", "at") as f:
        f.write(json.dumps({"text": "extra", "timestamp": "", "url": ""}) + "\n")
    assert data_fingerprint("c4", data_dir=tmp_path / "c4") != local


# --- windowing -------------------------------------------------------------------------


def test_windows_drop_the_remainder_without_overlap():
    ids = torch.arange(23)
    out = windows(ids, 5)
    assert out.shape == (4, 5)
    assert torch.equal(out, torch.arange(20).view(4, 5))
    assert torch.equal(windows(ids.view(1, 23), 5), out)  # a tokenizer's (1, N) tensor too
    assert torch.equal(windows(torch.arange(10), 5), torch.arange(10).view(2, 5))  # exact fit


def test_windows_reject_too_short():
    with pytest.raises(TopiaryError, match="seqlen: 1 is too short"):
        windows(torch.arange(10), 1)
    with pytest.raises(TopiaryError, match="has 4 tokens, fewer than one window of 5"):
        windows(torch.arange(4), 5)
