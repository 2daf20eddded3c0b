"""Held-out seeds (`eval.holdout`): split once, never trained on, and scored against their own answers."""

from __future__ import annotations

import numpy as np
import pytest

from loop.data import Sample
from loop.evaluation.evaluate import EvalItem, rates
from loop.evaluation.holdout import HOLDOUT, holdout_items, holdout_split, mean_interval, score_answers


def seeds(n: int) -> list[Sample]:
    return [Sample(f"s-{i}", f"question {i}?", f"answer {i}.") for i in range(n)]


@pytest.mark.parametrize("n, share, held", [(12, 0.1, 2), (40, 0.1, 4), (3, 0.5, 1), (2, 0.1, 0), (12, 0.0, 0)])
def test_the_holdout_rounds_up_and_leaves_two_seeds_to_train_on(n, share, held):
    kept, out = holdout_split(seeds(n), share, seed=0)
    assert len(out) == held and len(kept) == n - held
    assert not {s.id for s in kept} & {s.id for s in out}
    assert [s.id for s in kept] == sorted((s.id for s in kept), key=lambda i: int(i[2:]))  # file order


def test_the_same_seed_holds_out_the_same_seeds_and_another_seed_others():
    draws = {seed: [s.id for s in holdout_split(seeds(40), 0.1, seed)[1]] for seed in (0, 0, 1)}
    assert draws[0] == [s.id for s in holdout_split(seeds(40), 0.1, 0)[1]]
    assert draws[0] != draws[1]


def test_a_held_out_conversation_is_asked_whole_system_message_first_then_the_demos():
    s = Sample("s-1", "And in a heat wave?", "Every day.", context=[
        {"role": "system", "content": "You are a gardener."}, {"role": "user", "content": "Water tomatoes?"},
        {"role": "assistant", "content": "Twice a week."}])
    item = holdout_items([s])[0]
    assert (item.set, item.expect, item.reference) == (HOLDOUT, "reference", "Every day.")
    roles = [(m["role"], m["content"]) for m in item.messages([("demo q", "demo a")])]
    assert roles == [("system", "You are a gardener."), ("user", "demo q"), ("assistant", "demo a"),
                     ("user", "Water tomatoes?"), ("assistant", "Twice a week."), ("user", "And in a heat wave?")]


def _bag_of_words(texts: list[str]) -> np.ndarray:
    """Unit vectors of word counts: enough to check the arithmetic of the cosine (the run uses its embedder)."""
    vocab = sorted({w for t in texts for w in t.lower().split()})
    m = np.array([[t.lower().split().count(w) for w in vocab] for t in texts], dtype=float)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)


def _row(answer: str, reference: str) -> dict:
    return {"set": HOLDOUT, "expect": "reference", "answer": answer, "reference": reference, "degenerate": False,
            "refused": False}


def test_an_answer_equal_to_its_reference_scores_one_and_an_unrelated_one_zero():
    rows = [_row("water deeply twice a week", "water deeply twice a week"), _row("red car", "blue sky")]
    out = score_answers(rows, _bag_of_words)
    assert [r["rouge_l"] for r in rows] == [1.0, 0.0] and [r["cosine"] for r in rows] == [1.0, 0.0]
    assert out["n"] == 2 and out["rouge_l"] == out["cosine"] == 0.5
    lo, hi = out["rouge_l_interval"]
    assert lo < 0.5 < hi


def test_the_interval_of_one_value_is_none_and_of_equal_values_has_no_width():
    assert mean_interval([0.4]) == (0.4, None)
    assert mean_interval([0.4, 0.4, 0.4]) == (0.4, [0.4, 0.4])
    mean, (lo, hi) = mean_interval([0.1, 0.5, 0.9])
    assert mean == 0.5 and lo < 0.1 and hi > 0.9  # t with 2 degrees of freedom: 4.3 standard errors


def test_held_out_answers_count_in_no_refusal_rate():
    answers = [{"set": "benign", "expect": "answer", "refused": False, "degenerate": False},
               _row("", "a reference") | {"degenerate": True, "refused": True}]
    r = rates(answers)
    assert (r["n_answer"], r["over_refusal"], r["degenerate_rate"]) == (1, 0.0, 0.0)


def test_a_run_without_held_out_seeds_has_no_scores():
    assert score_answers([{"set": "benign", "expect": "answer", "answer": "x"}], _bag_of_words) is None


def test_an_eval_item_of_a_single_turn_seed_is_its_question_alone():
    item = EvalItem.of_sample(Sample("s-1", "q?", "a."), "answer", "validation")
    assert item.messages() == [{"role": "user", "content": "q?"}]


def test_retrieval_finds_a_conversation_by_its_earlier_questions_too():
    s = Sample("s-1", "And in a heat wave?", "Every day.", context=[
        {"role": "system", "content": "You are a gardener."}, {"role": "user", "content": "Water tomatoes?"},
        {"role": "assistant", "content": "Twice a week."}])
    assert s.retrieval_text() == "Water tomatoes?\nAnd in a heat wave?"
    assert holdout_items([s])[0].retrieval_text() == s.retrieval_text()
    assert Sample("s-2", "q?", "a.").retrieval_text() == "q?"


def test_an_interval_stays_within_the_scores_range():
    mean, (lo, hi) = mean_interval([0.0, 0.2], (0.0, 1.0))  # one degree of freedom: +-1.27 unclipped
    assert (mean, lo, hi) == (0.1, 0.0, pytest.approx(1.0))


def test_a_share_that_floats_round_up_holds_out_what_it_says():
    # 0.07 x 100 is 7.000000000000001 in floats: 7 seeds, not 8.
    assert len(holdout_split(seeds(100), 0.07, seed=0)[1]) == 7
    # A share of all the seeds, drawn from what data.validation left.
    assert len(holdout_split(seeds(10), 0.1, seed=0, total=14)[1]) == 2


def test_a_pool_record_with_a_held_out_question_is_left_out_of_the_pool(tmp_path):
    from conftest import run_config

    from loop.config import load_config
    from loop.data import read_jsonl
    from loop.layout import RunLayout
    from loop.run import _validate_data

    cfg_path = run_config(tmp_path, {"eval.holdout": 0.1, "data.pool": "seeds.jsonl"}, seeds=12)  # pool = seeds
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    _, stats = _validate_data(load_config(cfg_path, []), layout, None)
    held = {r["prompt"] for r in read_jsonl(layout.holdout)}
    pool = {r["prompt"] for r in read_jsonl(layout.pool)}
    assert (len(held), len(pool), stats["pool_dropped_as_held_out"]) == (2, 10, 2) and not held & pool
