"""Held-out seeds: which iteration is the run's model.

Self-training plateaus or collapses after a few rounds (I-SHEEP, SOFT), and on a
small model one round can undo another (EXPERIMENTS.md), so the last
iteration is not always the best. ISARA has no labels beyond the seeds, so
the check uses seeds the run never sees (`data.validation` of them): they
are not trained on, not retrieved as demos, not shown to a baseline. After
each iteration the model answers their questions greedily, and an answer is
right when it is of the kind of the held-out answer (loop/generation/kinds.py: how it
opens, learnt from the training seeds' answers) and not degenerate. Nothing
here knows the domain: in the safety domain "the kind" is refusing or
helping, in a user's domain whatever ways its answers differ.

The score is the mean over kinds of the share answered right (balanced
accuracy), so a model that gives every question one kind of answer scores
1/kinds whatever the held-out mix is. The run's model is the iteration with
the highest score, the earlier on a tie: as in early stopping, a later round
must earn its place by a better score, since self-training drifts (on the
demo run decided-vote-2026-12-01, iterations 1-3 all scored 6 of 8 while over-refusal went
from 9% to 25%; EXPERIMENTS.md).
"""

from __future__ import annotations

import random

import numpy as np

from loop.data import Sample
from loop.generation.kinds import UNKNOWN, AnswerKinds


def held_out_split(seeds: list[Sample], n: int, kinds: int, opening_words: int,
                   seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(training seeds, held-out seeds): n held out in a seeded random order, taking turns over the seeds'
    groups so each is held out in equal measure (while it has seeds to spare). The groups are the ones the data
    names (`meta.kind` on every seed: the safety domain's harmful, everyday and look-alike questions, so the
    held-out seeds can see a model that answers everyday questions and refuses look-alikes), else the answer
    kinds learnt from how the answers open."""
    if n == 0:
        return seeds, []
    named = [s.meta.get("kind") if isinstance(s.meta, dict) else None for s in seeds]
    if all(isinstance(g, str) and g for g in named) and len(set(named)) > 1:
        labels = named
    else:
        labels = [int(k) for k in AnswerKinds.fit(np.zeros((len(seeds), 1)), [s.response for s in seeds], kinds,
                                                  opening_words=opening_words, seed=seed).seed_kinds]
    rng = random.Random(seed)
    queues = {}
    for i in rng.sample(range(len(seeds)), len(seeds)):
        queues.setdefault(labels[i], []).append(i)
    # Each group keeps at least one seed for training: a kind with no seed left would vanish from the run.
    held, turn = [], 0
    order = sorted(queues)
    while len(held) < n and any(len(q) > 1 for q in queues.values()):
        q = queues[order[turn % len(order)]]
        if len(q) > 1:
            held.append(q.pop())
        turn += 1
    held_set = set(held)
    return [s for i, s in enumerate(seeds) if i not in held_set], [seeds[i] for i in sorted(held)]


def judge(kinds: AnswerKinds, references: list[str], answers: list[str], degenerate: list[bool]) -> dict:
    """Score the answers to the held-out questions against the held-out answers (see the module's note)."""
    want, got = kinds.kind_of(references), kinds.kind_of(answers)
    right = (want == got) & ~np.asarray(degenerate, dtype=bool)
    # A held-out answer that opens with no word a training seed opens with has no kind to match: no evidence.
    per_kind = {int(k): round(float(right[want == k].mean()), 4) for k in sorted(set(want.tolist()) - {UNKNOWN})}
    return {"score": round(float(np.mean(list(per_kind.values()))), 4) if per_kind else 0.0,
            "right": int(right.sum()), "n": len(answers), "per_kind": per_kind,
            "kinds": [int(k) for k in got], "wanted": [int(k) for k in want]}


def chosen(scores: dict[int, float]) -> int | None:
    """The iteration with the best score; the earlier one on a tie. None without scores."""
    return max(scores, key=lambda t: (scores[t], -t)) if scores else None


def run_model(scores: dict[int, float], iterations: list[int]) -> int | None:
    """The run's model among `iterations` (those exported, or those evaluated): the one that scored best on
    the held-out seeds (`chosen`), else the latest; None without iterations. Every reader of a run's model
    (serve, chat, eval and export of a run, the report, the draws) asks this."""
    best = chosen({t: s for t, s in scores.items() if t in iterations})
    return best if best is not None else max(iterations, default=None)
