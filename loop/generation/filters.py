"""Filters for generated samples. Each returns a rejection reason or None.

Reasons (counted per iteration and kept in `rejected.jsonl`):
  parse          the output is not a question/answer (empty, or holds a marker)
  too_short      shorter than filters.min_*_chars
  too_long       longer than filters.max_*_chars, or cut off at max tokens
  repetition     degenerate: more than filters.max_repeated_ngram_share of word 3-grams repeat
  near_duplicate the question is too close to a known one: embedding cosine above
                 filters.max_question_cosine, or ROUGE-L F >= filters.max_question_rouge_l
                 (as in Self-Instruct) against every known question
  copied_demo    the question or the answer is a demo's, verbatim
  neighbour_disagrees  the answer's kind is not the one its question's nearest seeds vote for
                 (filters.neighbour_agreement; see loop/generation/kinds.py)
  vote_undecided the question's nearest seeds are split: the winning kind holds less than
                 filters.min_vote_share of their vote (checked before the question is answered)
  far_from_seeds no seed question is as close as filters.min_seed_similarity (checked before
                 the question is answered)
  kind_border    the nearest seed of the voted kind is not closer than the nearest seed of
                 another kind by filters.min_kind_margin (checked before the question is answered)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loop.config import FilterConfig
from loop.generation.kinds import UNKNOWN, AnswerKinds, vote_share

REASONS = ("parse", "too_short", "too_long", "repetition", "near_duplicate", "copied_demo", "neighbour_disagrees",
           "vote_undecided", "far_from_seeds")


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for none, near 1 for a loop)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def check_text(text: str | None, *, min_chars: int, max_chars: int, cfg: FilterConfig,
               truncated: bool = False) -> str | None:
    if text is None:
        return "parse"
    if repeated_ngram_share(text) > cfg.max_repeated_ngram_share:
        return "repetition"  # first: a loop that ran into max tokens is degenerate, not merely long
    if len(text) < min_chars:
        return "too_short"
    if len(text) > max_chars or truncated:
        return "too_long"
    return None


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def copied_from_demos(text: str, demo_texts: list[str]) -> bool:
    """Verbatim copy of a demo (ignoring case, spacing and punctuation)."""
    t = _normal(text)
    return any(t == _normal(d) for d in demo_texts)


class NearDuplicates:
    """Question novelty against every known question: by embedding, then by ROUGE-L."""

    def __init__(self, cfg: FilterConfig):
        from rouge_score import rouge_scorer

        self.cfg = cfg
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def check(self, question: str, vector, index) -> tuple[str | None, dict]:
        item, cos = index.nearest_question(vector)
        if item is not None and cos > self.cfg.max_question_cosine:
            return "near_duplicate", {"by": "cosine", "score": round(cos, 4), "of": item["id"]}
        best, best_id = 0.0, None
        for it in index.items:
            f = self.scorer.score(it["prompt"], question)["rougeL"].fmeasure
            if f > best:
                best, best_id = f, it["id"]
        if best >= self.cfg.max_question_rouge_l:
            return "near_duplicate", {"by": "rouge_l", "score": round(best, 4), "of": best_id}
        return None, {"nearest_cosine": round(cos, 4), "max_rouge_l": round(best, 4)}


# --- the two chains, in the order a candidate meets them ----------------------------------

@dataclass
class QuestionVerdict:
    reason: str | None  # None: the question goes on to be answered
    vector: object = None  # its embedding (None when it was rejected before being embedded)
    novelty: dict | None = None  # the near-duplicate check's numbers, recorded with the sample
    vote: tuple | None = None  # the seeds' vote on its answer's kind: (kind, scores, neighbours)
    detail: dict = field(default_factory=dict)  # what only its rejected row records


def check_question(question: str | None, *, truncated: bool, demos: list[str], cfg: FilterConfig, embed, dups:
                   NearDuplicates, index, kinds: AnswerKinds | None, neighbours: int) -> QuestionVerdict:
    """A stage-1 question, before it is answered: its text, a verbatim copy of a demo, novelty against every
    known question, then (with the seeds' answer kinds) how near a seed it is and how decided their vote."""
    reason = check_text(question, min_chars=cfg.min_question_chars, max_chars=cfg.max_question_chars, cfg=cfg,
                        truncated=truncated)
    if reason is None and copied_from_demos(question, demos):
        reason = "copied_demo"
    if reason is not None:
        return QuestionVerdict(reason)
    vector = embed([question])[0]
    reason, novelty = dups.check(question, vector, index)
    verdict = QuestionVerdict(reason, vector, novelty)
    if reason is not None or kinds is None:
        return verdict
    verdict.vote = vote = kinds.vote(vector, neighbours)
    if cfg.min_seed_similarity > 0:
        nearest = kinds.nearest_similarity(vector)
        if nearest < cfg.min_seed_similarity:
            verdict.reason, verdict.detail = "far_from_seeds", {"nearest_seed": round(nearest, 3)}
            return verdict
    if vote_share(vote[1]) < cfg.min_vote_share:
        verdict.reason, verdict.detail = "vote_undecided", {"vote": {"expected": vote[0], "scores": vote[1]}}
        return verdict
    if cfg.min_kind_margin > 0:
        margin = kinds.kind_margin(vector, vote[0])
        if margin < cfg.min_kind_margin:
            verdict.reason = "kind_border"
            verdict.detail = {"margin": round(margin, 3), "vote": {"expected": vote[0], "scores": vote[1]}}
    return verdict


@dataclass
class AnswerVerdict:
    reason: str | None  # None: the sample is accepted
    kind: int | None = None  # the answer's kind (with the seeds' answer kinds)
    record: dict | None = None  # its kind against the voted one, recorded with the sample


def check_answer(answer: str | None, *, truncated: bool, demos: list[str], cfg: FilterConfig,
                 kinds: AnswerKinds | None, asked: str, question: QuestionVerdict, dups: NearDuplicates,
                 index) -> AnswerVerdict:
    """A stage-2 answer: its text, a verbatim copy of a demo, its kind against the one the question's nearest
    seeds voted for, then the question's novelty again (another attempt may have been accepted meanwhile)."""
    reason = check_text(answer, min_chars=cfg.min_answer_chars, max_chars=cfg.max_answer_chars, cfg=cfg,
                        truncated=truncated)
    if reason is None and copied_from_demos(answer, demos):
        reason = "copied_demo"
    verdict = AnswerVerdict(reason)
    if reason is None and kinds is not None:
        verdict.kind = kind = int(kinds.kind_of([answer])[0])
        expected, scores, _ = question.vote
        verdict.record = {"answer": None if kind == UNKNOWN else kind, "expected": expected, "scores": scores}
        if cfg.neighbour_agreement and kind not in (UNKNOWN, expected):  # an unknown kind is not evidence
            verdict.reason = "neighbour_disagrees"
    if verdict.reason is None:
        verdict.reason, _ = dups.check(asked, question.vector, index)
    return verdict
