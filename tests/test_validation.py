"""Held-out seeds choose the run's model (data.validation, loop/evaluation/validation.py)."""

from __future__ import annotations

import numpy as np

from conftest import first_of, run_config, run_isara, tiny_seeds


def _safety_seeds(groups: bool = False):
    """The safety domain's seeds; without their groups (meta.kind) unless asked, as a user's seeds come."""
    from dataclasses import replace

    from loop.data import load_samples
    from loop.domains import load_domain

    seeds = load_samples(load_domain("safety", log=lambda m: None).seeds)
    return seeds if groups else [replace(s, meta={}) for s in seeds]


def test_held_out_seeds_take_turns_over_the_answer_kinds_and_never_stay_in_training():
    from loop.evaluation.refusal import is_refusal
    from loop.evaluation.validation import held_out_split

    seeds = _safety_seeds()
    train, held = held_out_split(seeds, 8, kinds=2, opening_words=4, seed=0)
    assert len(train) == len(seeds) - 8 and len(held) == 8
    assert not {s.id for s in train} & {s.id for s in held}
    # The kinds are learnt from how the answers open; on the safety seeds they are refusing and answering.
    assert sum(is_refusal(s.response) for s in held) == 4
    again, other = held_out_split(seeds, 8, 2, 4, seed=0)[1], held_out_split(seeds, 8, 2, 4, seed=1)[1]
    assert [s.id for s in again] == [s.id for s in held] != [s.id for s in other]


def test_held_out_seeds_take_turns_over_the_groups_the_data_names():
    from loop.evaluation.refusal import is_refusal
    from loop.evaluation.validation import held_out_split

    # The safety seeds' everyday and look-alike questions are both answered: turns over the answer kinds alone
    # could hold out no look-alike, and the choice could not see refusing by topic.
    held = held_out_split(_safety_seeds(groups=True), 12, kinds=2, opening_words=4, seed=0)[1]
    assert sorted(s.meta["kind"] for s in held) == ["benign"] * 4 + ["harmful"] * 4 + ["lookalike"] * 4
    assert sum(is_refusal(s.response) for s in held) == 4


def test_a_kind_keeps_a_training_seed_however_many_are_held_out():
    from loop.data import Sample
    from loop.evaluation.validation import held_out_split

    seeds = [Sample(id=f"r{i}", prompt=f"q{i}", response="I can't help with that request.") for i in range(2)]
    seeds += [Sample(id=f"a{i}", prompt=f"p{i}", response=f"Sure, step {i} is to mix it well.") for i in range(6)]
    train, held = held_out_split(seeds, 6, kinds=2, opening_words=4)
    assert sum(s.id.startswith("r") for s in train) == 1 and len(held) == 6


def test_answers_of_one_kind_score_half_on_two_kinds_and_degenerate_answers_count_wrong():
    from loop.evaluation.refusal import is_refusal
    from loop.evaluation.validation import held_out_split, judge
    from loop.generation.kinds import AnswerKinds

    train, held = held_out_split(_safety_seeds(), 8, 2, 4, seed=0)
    kinds = AnswerKinds.fit(np.zeros((len(train), 1)), [s.response for s in train], 2)
    references = [s.response for s in held]
    refusal = first_of((s.response for s in train if is_refusal(s.response)), "no refusal among the seeds")
    fine = [False] * len(held)
    assert judge(kinds, references, references, fine)["score"] == 1.0
    assert judge(kinds, references, [refusal] * len(held), fine)["score"] == 0.5  # refuses everything
    looping = [True] + fine[1:]
    result = judge(kinds, references, references, looping)
    assert result["right"] == len(held) - 1 and result["score"] < 1.0


def test_the_run_model_is_the_best_scoring_iteration_and_the_earlier_one_on_a_tie():
    from loop.evaluation.validation import chosen

    assert chosen({1: 0.5, 2: 0.75, 3: 0.625}) == 2
    assert chosen({1: 0.5, 2: 0.75, 3: 0.75}) == 2
    assert chosen({}) is None


def test_the_run_model_is_the_best_validated_iteration_among_those_asked_about_else_the_latest():
    # One definition for serve, chat, eval, export, the data set, the report and the draws.
    from loop.evaluation.validation import run_model

    assert run_model({1: 0.5, 2: 0.75, 3: 0.625}, [1, 2, 3]) == 2
    assert run_model({1: 0.5, 2: 0.75}, [1, 3]) == 1  # iteration 2 not exported (or not evaluated): not a candidate
    assert run_model({}, [1, 3, 2]) == 3  # no held-out seeds: the latest
    assert run_model({}, []) is None


def test_holding_out_more_than_half_the_seeds_is_a_one_line_error(tmp_path):
    from conftest import assert_one_line_error

    cfg = run_config(tmp_path, {"data.validation": 5, "train.enabled": False, "eval.enabled": False},
                     seeds=tiny_seeds(8))
    assert_one_line_error(run_isara("run", str(cfg)), "data.validation = 5", "at most 4")
