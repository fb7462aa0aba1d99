"""Zero-shot evaluation: real lm-eval on the embedded suite and on the official tasks' fixtures.

The official tasks run unmodified on the few rows in ``tests/fixtures/lm_eval`` (same
schema as each data set), through YAMLs generated at test time, since they ``include``
the installed lm-eval by absolute path.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from modules.errors import TopiaryError
from modules.evaluation.suite import build_embedded_suite, item_requests
from modules.evaluation.zeroshot import (
    EMBEDDED_TASKS,
    OFFICIAL_TASKS,
    SUITE_DIR,
    check_tasks,
    format_table,
    memo_hflm,
    official_task_yaml,
    summarize,
    task_manager,
    valid_task_names,
    zeroshot,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lm_eval"
WITH_NORM = {"hellaswag", "arc_easy", "arc_challenge", "openbookqa"}


class Tripwire:
    """Stands in for a model or tokenizer: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"model work started before the task check (touched .{name})")


@pytest.fixture(scope="module")
def embedded():
    from modules.engine.models import load_model

    return load_model("embedded", device="cpu")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SUITE_DIR / f"{name}.jsonl").read_text().splitlines()]


def _loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's scoring of one request, written out: trailing context spaces move to the
    continuation, an empty context becomes the prefix token, the continuation's tokens are
    those of the whole string after the context's. Returns (log-likelihood, is_greedy)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if context:
        ctx = tok(context)["input_ids"]
        cont = tok(context + continuation)["input_ids"][len(ctx) :]
    else:
        ctx, cont = [tok.eos_token_id], tok(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.log_softmax(-1)[0, -len(cont) :]
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), logp.argmax(-1).tolist() == cont


def _encodings(lm, pairs: list[tuple[str, str]]) -> list:
    """What lm-eval's ``loglikelihood`` asks ``tok_encode`` for, pair by pair."""
    return [lm._encode_pair(c, d) if c else lm.tok_encode(d, add_special_tokens=False) for c, d in pairs]


def test_remembered_ids_are_lm_evals_and_follow_the_tokenizer(embedded):
    """The pipeline's second zero-shot run takes its ids from the first's: they are lm-eval's
    own for every kind of request of the suite, and a different tokenizer is not served them."""
    from lm_eval.models.huggingface import HFLM

    model, tok = embedded
    pairs = [p for name in EMBEDDED_TASKS for row in _rows(name)[:150] for p in item_requests(name, row)]
    want = _encodings(HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu"), pairs)
    for _ in range(2):  # computed, then remembered by a new instance (as the pruned model's run)
        assert (
            _encodings(memo_hflm()(pretrained=model, tokenizer=tok, batch_size=1, device="cpu"), pairs)
            == want
        )
    other = copy.deepcopy(tok)
    other.add_tokens([" the"])  # same strings, other ids
    want = _encodings(HFLM(pretrained=model, tokenizer=other, batch_size=1, device="cpu"), pairs)
    lm = memo_hflm()(pretrained=model, tokenizer=other, batch_size=1, device="cpu")
    assert _encodings(lm, pairs) == want


# ----------------------------------------------------------------- names and reachability


def test_unknown_task_lists_valid_names():
    with pytest.raises(TopiaryError) as err:
        check_tasks(["embedded", "hellaswagg"])
    msg = str(err.value)
    assert "'hellaswagg'" in msg
    for name in valid_task_names():
        assert name in msg


def test_empty_task_list_is_an_error():
    with pytest.raises(TopiaryError, match="empty"):
        check_tasks([])


def test_official_task_offline_without_data_fails_before_model_work():
    # conftest sets HF_DATASETS_OFFLINE=1 and an empty HF_HOME: no Hub, no cache
    with pytest.raises(TopiaryError) as err:
        zeroshot(Tripwire(), Tripwire(), ["embedded", "winogrande"])
    msg = str(err.value)
    assert "'winogrande'" in msg and "allenai/winogrande" in msg
    assert "cache" in msg and "data directory" in msg and "winogrande.jsonl" in msg


def test_data_dir_without_the_task_file_names_the_file(tmp_path):
    (tmp_path / "boolq.jsonl").write_text((FIXTURES / "boolq.jsonl").read_text())
    plan = check_tasks(["boolq"], data_dir=tmp_path)
    assert plan.local == {"boolq": (tmp_path / "boolq.jsonl").resolve()} and plan.hub == []
    with pytest.raises(TopiaryError, match=r"'arc_easy'.*arc_easy\.jsonl does not exist"):
        check_tasks(["boolq", "arc_easy"], data_dir=tmp_path)


def test_data_dir_file_in_the_wrong_schema(tmp_path):
    (tmp_path / "rte.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": 0}) + "\n")
    with pytest.raises(TopiaryError, match=r"'rte'.*sentence1, sentence2"):
        check_tasks(["rte"], data_dir=tmp_path)


def test_missing_data_dir():
    with pytest.raises(TopiaryError, match="not a directory"):
        check_tasks(["boolq"], data_dir="/nonexistent/topiary-data")


def test_group_names_expand_in_order_without_duplicates():
    plan = check_tasks(["embedded", "topiary_order", "official", "boolq"], data_dir=FIXTURES)
    assert plan.requested == ["embedded", "topiary_order", *OFFICIAL_TASKS]
    assert plan.leaves == [*EMBEDDED_TASKS, *OFFICIAL_TASKS]


# ----------------------------------------------------------------- official tasks on fixtures


def test_override_yaml_changes_only_the_data_source():
    cfg = json.loads(official_task_yaml("arc_challenge", FIXTURES / "arc_challenge.jsonl"))
    assert Path(cfg["include"]).name == "arc_challenge.yaml" and Path(cfg["include"]).is_file()
    assert cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
    assert cfg["dataset_kwargs"] == {
        "data_files": {"test": str((FIXTURES / "arc_challenge.jsonl").resolve())}
    }
    assert (cfg["training_split"], cfg["validation_split"], cfg["test_split"]) == (None, None, "test")
    assert set(cfg) == {
        "include",
        "task",
        "dataset_path",
        "dataset_name",
        "dataset_kwargs",
        *(f"{s}_split" for s in ("training", "validation", "test")),
    }


@pytest.fixture(scope="module")
def official_tasks(tmp_path_factory):
    """The seven official tasks as lm-eval builds them, reading the fixture files."""
    plan = check_tasks(["official"], data_dir=FIXTURES)
    manager = task_manager(plan, tmp_path_factory.mktemp("lm_eval_yaml"))
    tasks = manager.load(plan.requested)["tasks"]
    for task in tasks.values():
        task.build_all_requests()
    return tasks


def _requests(task, doc_index: int) -> list[tuple[str, str]]:
    return [inst.args for inst in task.instances if inst.doc_id == doc_index]


def test_official_tasks_read_the_fixture_split_they_score(official_tasks):
    assert sorted(official_tasks) == sorted(OFFICIAL_TASKS)
    for name, task in official_tasks.items():
        split = OFFICIAL_TASKS[name][1]
        assert len(task.eval_docs) == 3, name
        assert (task.config.test_split if split == "test" else task.config.validation_split) == split


def test_hellaswag_keeps_its_preprocessing(official_tasks):
    task = official_tasks["hellaswag"]
    assert task.config.process_docs is not None
    doc = task.eval_docs[0]
    # activity label + ": " + ctx_a + " " + ctx_b.capitalize(), " [title]" -> ". ",
    # other [bracket] artefacts removed, one pass of double spaces -> single
    assert doc["query"] == (
        "Home and Garden: How to repot a houseplant. Water the plant a day before. "
        "Moist soil holds together and slides out of the old pot more easily."
    )
    assert (
        doc["choices"][0] == " Turn the pot on its side and tap the bottom until the root ball comes loose."
    )
    assert doc["gold"] == 0 and task.eval_docs[2]["gold"] == 1
    assert task.eval_docs[1]["query"] == (
        "Making a sandwich: A man puts two slices of bread on a cutting board. He"
    )
    assert _requests(task, 1)[0] == (
        task.eval_docs[1]["query"],
        " spreads butter on one slice and adds cheese and tomato.",
    )


def test_winogrande_scores_the_partial_target_after_each_option(official_tasks):
    task = official_tasks["winogrande"]
    assert _requests(task, 0) == [
        ("The trophy did not fit into the suitcase because the trophy", " was too big."),
        ("The trophy did not fit into the suitcase because the suitcase", " was too big."),
    ]
    doc = task.eval_docs[1]
    assert task.doc_to_text(doc) == 1  # answer "2": the gold context is the second one


def test_other_official_prompts(official_tasks):
    boolq = _requests(official_tasks["boolq"], 1)
    assert [cont for _, cont in boolq] == [" no", " yes"]
    assert boolq[0][0].endswith(
        "\nQuestion: does a tuple allow its items to be changed after creation?\nAnswer:"
    )
    assert [c for _, c in _requests(official_tasks["rte"], 0)] == [" True", " False"]
    arc = official_tasks["arc_easy"]
    assert arc.doc_to_target(arc.eval_docs[2]) == 2  # numeric answer labels "1".."3"
    assert _requests(official_tasks["openbookqa"], 2)[2] == ("Sound travels fastest through", " steel")


@pytest.mark.slow  # a full lm-eval run (seconds alone; 10+ s on busy shared cores)
def test_official_seven_run_on_fixtures(embedded):
    model, tok = embedded
    result = zeroshot(model, tok, ["official"], batch_size=8, data_dir=FIXTURES)
    assert list(result["tasks"]) == list(OFFICIAL_TASKS)
    assert result["n"] == {name: 3 for name in OFFICIAL_TASKS}
    for name, scores in result["tasks"].items():
        assert set(scores) >= ({"acc", "acc_norm"} if name in WITH_NORM else {"acc"}), name
        assert ("acc_norm" in scores) == (name in WITH_NORM), name
        assert math.isclose(scores["acc"] * 3, round(scores["acc"] * 3)), name  # 3 items each
    accs = [s["acc"] for s in result["tasks"].values()]
    assert result["mean_acc"] == pytest.approx(sum(accs) / 7) and result["mean_metric"] == "acc"


def test_mean_is_over_acc_never_acc_norm():
    # The fast-tier twin of the two slow runs' mean check: lm-eval's results in its own
    # layout ("metric,filter" keys, n-samples), acc_norm higher than acc where it exists.
    out = {
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7},
            "rte": {"alias": "rte", "acc,none": 0.6, "acc_stderr,none": 0.1},
            "hellaswag": {
                "alias": "hellaswag",
                "acc,none": 0.25,
                "acc_norm,none": 0.45,
                "acc_norm_stderr,none": 0.1,
            },
        },
        "n-samples": {name: {"original": 40, "effective": 20} for name in ("arc_easy", "rte", "hellaswag")},
    }
    result = summarize(out, ["arc_easy", "rte", "hellaswag"], limit=20)
    assert result["mean_acc"] == pytest.approx((0.5 + 0.6 + 0.25) / 3) and result["mean_metric"] == "acc"
    assert result["tasks"]["hellaswag"] == {"acc": 0.25, "acc_norm": 0.45, "acc_norm_stderr": 0.1}
    assert result["n"] == {"arc_easy": 20, "rte": 20, "hellaswag": 20} and result["limit"] == 20
    assert "mean (acc)" in format_table(result)


# ----------------------------------------------------------------- the embedded suite


def _suite_corpus():
    """The embedded corpus, or a skip where this Python's gives another than the suite's."""
    from modules.data.corpus import build_corpus

    corpus, manifest = build_corpus(), json.loads((SUITE_DIR / "suite.json").read_text())
    if corpus.sha256() != manifest["corpus_sha256"]:
        pytest.skip(f"this Python's standard library gives another corpus than Python {manifest['python']}")
    return corpus


@pytest.mark.slow  # a full lm-eval run (seconds alone; 10+ s on busy shared cores)
def test_embedded_suite_with_limit_matches_a_direct_scoring(embedded):
    model, tok = embedded
    limit = 6
    result = zeroshot(model, tok, ["embedded"], limit=limit, batch_size=8, per_item=True)
    assert list(result["tasks"]) == list(EMBEDDED_TASKS)
    assert result["n"] == {name: limit for name in EMBEDDED_TASKS}
    assert "acc_norm" in result["tasks"]["topiary_word"]
    for name in EMBEDDED_TASKS:
        hits = []
        for row in _rows(name)[:limit]:
            scores = [_loglik(model, tok, ctx, cont) for ctx, cont in item_requests(name, row)]
            lls = [ll for ll, _ in scores]
            right = scores[0][1] if name == "topiary_greedy" else lls.index(max(lls)) == row["label"]
            hits.append(int(right))
        assert result["tasks"][name]["acc"] == pytest.approx(sum(hits) / limit), name
        assert result["items"]["acc"][name] == hits, name  # each item's own answer, in order
    assert set(result["items"]["docs"]) == set(EMBEDDED_TASKS)
    mean = sum(t["acc"] for t in result["tasks"].values()) / len(EMBEDDED_TASKS)
    assert result["mean_acc"] == pytest.approx(mean)
    table = format_table(result)
    assert all(name in table for name in EMBEDDED_TASKS) and "mean (acc)" in table


def test_suite_regenerates_byte_for_byte(tmp_path):
    manifest = json.loads((SUITE_DIR / "suite.json").read_text())
    corpus = _suite_corpus()
    counts = build_embedded_suite(tmp_path, corpus)
    assert counts == manifest["items"]
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in SUITE_DIR.iterdir() if p.is_file() and p.suffix != ".pyc")
    for name in generated:
        assert (tmp_path / name).read_bytes() == (SUITE_DIR / name).read_bytes(), name


def test_suite_items_are_well_formed_and_fit_the_reference_context(embedded):
    _, tok = embedded
    manifest = json.loads((SUITE_DIR / "suite.json").read_text())
    for name in EMBEDDED_TASKS:
        rows = _rows(name)
        assert len(rows) == manifest["items"][name] >= 1000, name
        for row in rows:
            pairs = item_requests(name, row)
            if name == "topiary_greedy":
                assert len(pairs) == 1 and row["word"].isalpha() and not row["context"][-1].isspace()
            else:
                assert len(pairs) == 4 and len(set(pairs)) == 4 and 0 <= row["label"] < 4
                delimiter = "" if name == "topiary_order" else " "  # spans stand alone; a word follows text
                assert [cont for _, cont in pairs] == [delimiter + choice for choice in row["choices"]]
            for ctx, cont in pairs:  # the reference model's context is 128 tokens
                assert len(tok(ctx + cont)["input_ids"]) <= 120, (ctx, cont)
        yaml_text = (SUITE_DIR / f"{name}.yaml").read_text()
        assert f"task: {name}" in yaml_text and yaml_text.count("\n# ") >= 3  # documented


def test_contexts_are_the_documents_own_text_line_breaks_kept():
    # collapsed whitespace is text the model never saw, and it hid Wanda 50%'s cost
    test = _suite_corpus().text("test")
    for name in ("topiary_greedy", "topiary_word"):
        rows = _rows(name)
        assert sum("\n" in row["context"] for row in rows) > len(rows) / 4, name
        for row in rows[:300]:
            word = row["word"] if name == "topiary_greedy" else row["choices"][row["label"]]
            assert row["context"] + " " + word in test, (name, row["context"][-60:])


def test_distractors_are_balanced():
    # every gold word is one item's answer and exactly three other items' distractor
    rows, field = _rows("topiary_word"), "choices"
    gold = Counter(row[field][row["label"]] for row in rows)
    shown = Counter(text for row in rows for text in row[field])
    assert shown == Counter({text: 4 * count for text, count in gold.items()})
    labels = Counter(row["label"] for row in rows)
    assert min(labels.values()) > len(rows) / 8


def test_order_choices_are_the_same_words_with_neighbours_swapped():
    for row in _rows("topiary_order"):
        real = row["choices"][row["label"]].split()
        for choice in row["choices"]:
            words = choice.split()
            assert sorted(words) == sorted(real)
            moved = [i for i, (a, b) in enumerate(zip(words, real, strict=True)) if a != b]
            assert moved == [] or (len(moved) == 2 and moved[1] == moved[0] + 1), (choice, real)


# ----------------------------------------------------------------- scoring continuations only


@pytest.mark.slow  # two lm-eval runs of the suite (about 15-20 s on busy shared cores)
@pytest.mark.parametrize("which", ["embedded", "gemma2_capped"])
def test_continuation_scores_equal_upstream_item_by_item(embedded, which):
    """Topiary's HFLM (logits only at continuations) against lm-eval's own, request by request."""
    from lm_eval.models.huggingface import HFLM

    from benchmarks.bench_vocab import embedded_samples
    from tests.helpers import gemma2_capped

    model, tok = embedded
    if which == "gemma2_capped":  # a head whose output the model post-processes (soft-capping)
        model = gemma2_capped(model.config.vocab_size, max_positions=128)
    ours = embedded_samples(model, tok, memo_hflm(), 12, batch_size=8)
    theirs = embedded_samples(model, tok, HFLM, 12, batch_size=8)
    for name in theirs:
        assert len(ours[name]) == len(theirs[name]) == 12, name
        for a, b in zip(ours[name], theirs[name], strict=True):
            assert a["doc_hash"] == b["doc_hash"] and a["acc"] == b["acc"], (name, a["doc_id"])
            # The head's matmul over a continuation's rows instead of the padded batch may round
            # the fp32 logits in the last bit (seen: 1e-7 relative); the acc and greedy flags are exact.
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(
                a["filtered_resps"], b["filtered_resps"], strict=True
            ):
                assert greedy_a == greedy_b, (name, a["doc_id"])
                assert ll_a == pytest.approx(ll_b, rel=1e-6, abs=1e-6), (name, a["doc_id"])
