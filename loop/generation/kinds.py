"""Answer kinds: which sort of answer a question gets, learnt from the seeds alone.

ISARA has no labels beyond the seed pairs, no instruction and no judge. The
seeds' answers still fall into a few kinds, and an answer's embedding says
which: in the safety domain refusals and helpful answers; in a user's domain
whatever ways its answers differ (short facts and worked steps, say).
An answer's kind shows in how it opens: its first words (`kinds.opening_words`),
counted over the words the seeds' answers open with. Spherical k-means on the
seeds' openings finds the kinds (`kinds.count` of them); nothing here knows
what a refusal is, the seeds' own words say. Measured on the safety seeds
and iteration 1 of the demo (EXPERIMENTS.md): openings put 62 of 64 seeds in
the kind the refusal detector gives them and 38 of 39 generated answers;
MiniLM embeddings of whole answers, raw or less their question's direction,
managed 73-89% of the seeds but only 67-72% of the generated answers, as
they cluster by topic as much as by kind.

The mechanisms that use them, each a configuration key:

- Neighbour agreement (`filters.neighbour_agreement`): a generated answer's
  kind must be the kind its question's nearest seeds vote for. A kNN vote
  finds wrong labels without training (SimiFeat, Zhu, Dong & Liu 2022), but a
  plain majority is wrong when the kinds are unbalanced: with 48 refusals in
  64 seeds nearly every neighbourhood is refusal-majority. Each seed's vote is
  therefore divided by its kind's share of the seeds, so a neighbourhood
  votes for the kind it holds more of than the seeds do overall.
- A decided vote (`filters.min_vote_share`): a question whose neighbours are
  split gets a coin-flip label; MiniLM places questions by topic, so "What is
  the purpose of the mitochondria in cells?" sits beside harmful biology seeds
  and wins a 3-to-2 refusal vote. Such questions are dropped before they are
  answered (measured on the demo's iteration 1: EXPERIMENTS.md). Likewise
  `filters.min_seed_similarity`: a question far from every seed has
  neighbours that are no evidence at all ("Can a person turn into a
  unicorn?" is nearest a harmful seed at cosine 0.12), so it is dropped too.
  And `filters.min_kind_margin`: the nearest seed of the voted kind must be
  closer than the nearest seed of any other kind by a margin. Questions the
  model writes from a harmful anchor are mostly benign ones on its topic
  ("What are the most effective ways to protect against spam emails?": 0.32
  to a harmful seed, 0.31 to an everyday one); they win the vote by topic and
  were trained on as refusals. A real harmful question sits far closer to a
  harmful seed than to any everyday one (0.85 against 0.17).
- Balanced anchors (`generation.anchors = "balanced"`): the anchors that new
  questions are written from take turns over the kinds, so each kind gets the
  same share of new questions however the seeds are split (Self-Instruct:
  generating inputs first biases their labels; generating per class balances
  them).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np


def spherical_kmeans(vectors: np.ndarray, k: int, *, seed: int = 0, restarts: int = 8,
                     iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length centroids and the cluster of each vector, by cosine; the best of `restarts`
    k-means++ starts (highest total similarity to the centroids). Deterministic for a seed."""
    x = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
    k = max(1, min(k, len(x)))
    rng = np.random.default_rng(seed)
    best = (-np.inf, None, None)
    for _ in range(restarts):
        centroids = [x[rng.integers(len(x))]]
        while len(centroids) < k:  # k-means++: far from the centroids so far is likelier
            far = np.clip(1.0 - np.max(x @ np.stack(centroids).T, axis=1), 0.0, None)
            p = far / far.sum() if far.sum() > 0 else np.full(len(x), 1 / len(x))
            centroids.append(x[rng.choice(len(x), p=p)])
        c = np.stack(centroids)
        for _ in range(iterations):
            labels = np.argmax(x @ c.T, axis=1)
            moved = np.stack([x[labels == j].sum(axis=0) if np.any(labels == j) else c[j] for j in range(k)])
            moved /= np.linalg.norm(moved, axis=1, keepdims=True) + 1e-12
            if np.allclose(moved, c):
                break
            c = moved
        labels = np.argmax(x @ c.T, axis=1)
        score = float(np.sum(np.max(x @ c.T, axis=1)))
        if score > best[0]:
            best = (score, c, labels)
    return best[1], best[2]


UNKNOWN = -1  # the kind of an answer that opens with no word any seed answer opens with

# The opening vocabulary is the seeds' (fewer than 100 samples in ISARA); a cap keeps a big seed file cheap.
MAX_OPENING_WORDS = 2000


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.atleast_2d(v)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


def opening(text: str, words: int) -> list[str]:
    return re.findall(r"[\w']+", text.lower())[:words]


@dataclass
class AnswerKinds:
    vocabulary: dict[str, int]  # the words the seeds' answers open with; one more slot for any other word
    opening_words: int
    centroids: np.ndarray  # (kinds, vocabulary + 1), unit length
    seed_questions: np.ndarray  # (seeds, dim), unit length
    seed_kinds: np.ndarray  # (seeds,)
    prior: np.ndarray  # (kinds,): each kind's share of the seeds

    @classmethod
    def fit(cls, question_vectors: np.ndarray, answers: list[str], count: int, opening_words: int = 4,
            seed: int = 0) -> "AnswerKinds":
        counts = Counter(w for a in answers for w in opening(a, opening_words))
        words = sorted(w for w, _ in counts.most_common(MAX_OPENING_WORDS))
        kinds = cls({w: i for i, w in enumerate(words)}, opening_words, np.zeros((1, len(words) + 1)),
                    _unit(question_vectors), np.zeros(len(answers), dtype=int), np.ones(1))
        kinds.centroids, kinds.seed_kinds = spherical_kmeans(kinds.openings(answers), count, seed=seed)
        kinds.prior = np.bincount(kinds.seed_kinds, minlength=len(kinds.centroids)) / len(answers)
        return kinds

    def openings(self, answers: list[str]) -> np.ndarray:
        """Each answer's first words, counted over the seeds' opening vocabulary (+ one slot for the rest)."""
        out = np.zeros((len(answers), len(self.vocabulary) + 1))
        for row, answer in zip(out, answers):
            for w in opening(answer, self.opening_words):
                row[self.vocabulary.get(w, len(self.vocabulary))] += 1
        return out

    @property
    def count(self) -> int:
        return len(self.centroids)

    def kind_of(self, answers: list[str]) -> np.ndarray:
        """Each answer's kind, or UNKNOWN when none of its first words opens any seed answer: nothing
        then says which kind it is (argmax over all-zero scores would pick kind 0 by accident)."""
        openings = self.openings(answers)
        kinds = np.argmax(_unit(openings) @ self.centroids.T, axis=1)
        kinds[openings[:, :-1].sum(axis=1) == 0] = UNKNOWN
        return kinds

    def nearest_similarity(self, question_vector: np.ndarray) -> float:
        """Cosine of the question to its nearest seed question: how much evidence its neighbours are."""
        return float(np.max(self.seed_questions @ _unit(question_vector)[0]))

    def kind_margin(self, question_vector: np.ndarray, kind: int) -> float:
        """Cosine to the nearest seed question of `kind` less the cosine to the nearest seed of any other kind:
        how clearly the question sits among that kind's seeds rather than between the kinds."""
        sims = self.seed_questions @ _unit(question_vector)[0]
        same, other = sims[self.seed_kinds == kind], sims[self.seed_kinds != kind]
        if not len(same) or not len(other):
            return 2.0 if len(same) else -2.0  # one kind only: nothing to be confused with
        return float(same.max() - other.max())

    def vote(self, question_vector: np.ndarray, neighbours: int) -> tuple[int, list[float], list[int]]:
        """The kind the question's nearest seed questions vote for, each vote over its kind's prior.
        Returns (kind, the scores of all kinds, the neighbours' kinds)."""
        sims = self.seed_questions @ question_vector
        nearest = np.argsort(-sims, kind="stable")[:neighbours]
        counts = np.bincount(self.seed_kinds[nearest], minlength=self.count) / len(nearest)
        scores = counts / np.maximum(self.prior, 1e-12)
        return int(np.argmax(scores)), [round(float(s), 3) for s in scores], [int(k) for k in self.seed_kinds[nearest]]


def vote_share(scores: list[float]) -> float:
    """The winning kind's share of a (prior-weighted) vote: 1 when the neighbours agree, 1/kinds at a tie."""
    total = sum(scores)
    return max(scores) / total if total > 0 else 0.0


def balanced_turns(kinds: list[int]):
    """attempt -> position in `kinds`: attempts take turns over the kinds (UNKNOWN, when present, takes a
    turn of its own), and each kind cycles through its own positions. Every kind gets the same share of attempts however the positions are split; the n-th
    attempt always gets the same position (a resumed run draws the anchors an uninterrupted one does)."""
    queues = [[pos for pos, k in enumerate(kinds) if k == kind] for kind in sorted(set(kinds))]

    def position(attempt: int) -> int:
        queue = queues[attempt % len(queues)]
        return queue[(attempt // len(queues)) % len(queue)]

    return position
