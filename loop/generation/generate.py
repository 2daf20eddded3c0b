"""The generation phase of one iteration: retrieve, generate (two stages), filter.

Inputs: the domain index, the anchors (domain samples known at the start of
the iteration), the served model. Outputs, in the iteration folder:
`generated.jsonl` (accepted samples) and `rejected.jsonl` (every rejected
candidate with its reason), both appended one whole fsynced line at a time so
that a crash loses at most the requests in flight; `stats.json` at the end.

Resume: every finished attempt left exactly one line in one of the two files,
so the attempt counter restarts at their total. Attempt n always uses anchor
n and seeds derived from n: with one slot a resumed run writes the same data as
an uninterrupted one. With several slots, attempts finish out of order and
the invariant is weaker: no accepted sample is lost or duplicated and the
iteration ends with exactly the target count (or the attempt budget spent).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loop.config import RunConfig
from loop.data import Sample, append_jsonl, read_jsonl, sample_id
from loop.generation.filters import NearDuplicates, check_answer, check_question
from loop.generation.kinds import AnswerKinds, balanced_turns
from loop.generation.prompts import Format
from loop.generation.retrieval import DomainIndex, Embedder
from server.client import ContextExceeded

SAVE_INDEX_EVERY = 16


@dataclass
class StageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0

    def add(self, c) -> None:
        self.requests += 1
        self.prompt_tokens += c.prompt_tokens
        self.cached_tokens += c.cached_tokens
        self.completion_tokens += c.completion_tokens
        self.prompt_ms += c.prompt_ms or 0.0
        self.predicted_ms += c.predicted_ms or 0.0

    def summary(self, wall_s: float) -> dict:
        # Requests overlap on the server's slots, so throughput is tokens over the phase's wall time;
        # the server-side milliseconds (summed over requests) show where the server spent its time.
        # cached_tokens: prompt tokens the server reused from its prompt cache (prompts sharing a prefix).
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens,
                "prompt_tok_s": round(self.prompt_tokens / wall_s, 1) if wall_s else None,
                "gen_tok_s": round(self.completion_tokens / wall_s, 1) if wall_s else None,
                "server_prompt_ms": round(self.prompt_ms), "server_gen_ms": round(self.predicted_ms)}


@dataclass
class IterationState:
    accepted: list[dict]
    rejected: list[dict]
    attempts: int
    reasons: Counter = field(default_factory=Counter)
    surplus: int = 0
    question: StageTotals = field(default_factory=StageTotals)
    answer: StageTotals = field(default_factory=StageTotals)


def request_seed(base: int, iteration: int, attempt: int, stage: int) -> int:
    return (base * 1_000_003 + iteration * 100_003 + attempt * 2 + stage) % (2**31 - 1)


class GenerationPhase:
    def __init__(self, *, cfg: RunConfig, iteration: int, out_dir: Path, index: DomainIndex, embedder: Embedder,
                 client, anchors: list[int], events, kinds: AnswerKinds | None = None, adapters: int = 0):
        self.cfg, self.iteration, self.out_dir = cfg, iteration, out_dir
        self.index, self.embedder, self.client, self.events = index, embedder, client, events
        self.anchors = anchors  # index keys of the domain samples, in order
        self.kinds = kinds  # the seeds' answer kinds: recorded for every answer, used by the two mechanisms
        self.anchor_at = lambda attempt: attempt % len(anchors)
        self.item_kinds: dict[str, int] = {}  # every known sample's answer kind, once the index is complete
        if cfg.generation.anchors == "balanced" and kinds is not None:
            self.anchor_at = balanced_turns([int(k) for k in kinds.kind_of([index.items[k]["response"]
                                                                            for k in anchors])])
        # generation.question_model = "base": each served LoRA at scale 0 for stage 1 (llama-server takes the
        # scales per request; an empty list would keep the server's own).
        self.base_model = ({"lora": [{"id": i, "scale": 0.0} for i in range(adapters)]}
                           if cfg.generation.question_model == "base" and adapters else {})
        self.fmt = Format(cfg.question_marker, cfg.answer_marker)
        self.dups = NearDuplicates(cfg.filters)
        self.gen_path = out_dir / "generated.jsonl"
        self.rej_path = out_dir / "rejected.jsonl"
        g = cfg.generation
        self.target = g.samples
        self.max_attempts = int(g.samples * g.max_attempts_factor)
        self.warned_context = False  # a prompt over the slot's context is said once per phase

    # -- resume ----------------------------------------------------------
    def _load(self) -> IterationState:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        accepted, rejected = read_jsonl(self.gen_path), read_jsonl(self.rej_path)
        st = IterationState(accepted=accepted, rejected=rejected, attempts=len(accepted) + len(rejected))
        st.reasons.update(r["reason"] for r in rejected)
        # Accepted samples of a crashed attempt may be missing from the saved index.
        missing = [_as_sample(r) for r in accepted if r["id"] not in self.index]
        if missing:
            self.index.add(missing, self.embedder.encode_each([s.prompt for s in missing]))
        return st

    # -- one attempt -------------------------------------------------------
    def _demos_for(self, vector: np.ndarray, exclude: frozenset = frozenset()) -> list[dict]:
        r = self.cfg.retrieval
        demos = self.index.demos(vector, r.k, mmr_lambda=r.mmr_lambda, max_similarity=r.max_demo_similarity,
                                 pool_penalty=r.pool_penalty, exclude_ids=exclude)
        # The most relevant demo goes last, right before the text the model writes.
        return list(reversed(demos))

    def _random_demos(self, seed: int) -> list[dict]:
        """retrieval.k samples drawn uniformly from the index (seeds and accepted samples so far)."""
        keys = random.Random(seed).sample(range(len(self.index)), min(self.cfg.retrieval.k, len(self.index)))
        return [self.index.items[k] for k in keys]

    def _other_kinds(self, kind: int) -> frozenset:
        """Ids of the samples whose answers are not of `kind`: left out of the demos."""
        return frozenset(i for i, k in self.item_kinds.items() if k != kind)

    def _reject(self, st: IterationState, attempt: int, stage: str, reason: str, **detail) -> None:
        row = {"attempt": attempt, "iteration": self.iteration, "stage": stage, "reason": reason, **detail}
        append_jsonl(self.rej_path, row)
        st.rejected.append(row)
        st.reasons[reason] += 1
        self.events.emit("rejected", iteration=self.iteration, reason=reason, attempt=attempt,
                         accepted=len(st.accepted), target=self.target, busy=self.client.in_flight,
                         slots=self.client.capacity)

    def _questions_then_question(self, demos: list[dict]) -> str:
        return self.fmt.question_prompt([d["prompt"] for d in demos])

    def _pairs_then_question(self, demos: list[dict]) -> str:
        return self.fmt.question_prompt_from_pairs([(d["prompt"], d["response"]) for d in demos])

    async def _complete_fitting(self, demos: list[dict], prompt_of, **request):
        """The completion of `prompt_of(demos)` and the demos it showed. A prompt longer than a server slot's
        context is sent again without its least relevant demo (the first), until it fits: long seeds on a
        small context still give samples, from fewer examples. (None, []) when not even one demo fits."""
        while demos:
            try:
                return await self.client.complete(prompt_of(demos), **request), demos
            except ContextExceeded as e:
                if not self.warned_context:
                    self.warned_context = True
                    self.events.emit("message", text=(
                        f"iter {self.iteration}: a prompt of {e.prompt_tokens or 'more'} tokens exceeds the server "
                        f"slot's context ({e.n_ctx or self.cfg.generation.ctx_per_slot}): such prompts are sent "
                        "with fewer demos; raise generation.ctx_per_slot to show all of retrieval.k"))
                demos = demos[1:]
        return None, []

    async def _attempt(self, st: IterationState, attempt: int) -> None:
        g = self.cfg.generation
        f = self.cfg.filters
        anchor_key = self.anchors[self.anchor_at(attempt)]
        anchor = self.index.items[anchor_key]
        seed = request_seed(g.seed, self.iteration, attempt, 0)
        if g.question_demos == "random_pairs":
            q_demos, prompt_of = self._random_demos(seed), self._pairs_then_question
        else:
            q_demos, prompt_of = self._demos_for(self.index.vector(anchor_key)), self._questions_then_question
        t0 = time.perf_counter()
        q_out, q_demos = await self._complete_fitting(
            q_demos, prompt_of, max_tokens=g.max_question_tokens, stop=self.fmt.question_stops(),
            temperature=g.temperature, top_p=g.top_p, seed=seed, **self.base_model)
        if q_out is None:
            self._reject(st, attempt, "question", "prompt_too_long", anchor_id=anchor["id"])
            return
        st.question.add(q_out)
        question = self.fmt.parse_question(q_out.text)
        # generation.question_model = "base": the question came from the base weights (every adapter at scale 0)
        # of the server that answered as the iteration's model.
        base = {"anchor_id": anchor["id"], "question_demo_ids": [d["id"] for d in q_demos],
                "generated_by": {"question": {**_provenance(q_out), **({"adapters": "off"} if self.base_model
                                                                        else {})}}}
        q = check_question(question, truncated=q_out.finish_reason == "length", demos=[d["prompt"] for d in q_demos],
                           cfg=f, embed=self.embedder.encode, dups=self.dups, index=self.index, kinds=self.kinds,
                           neighbours=self.cfg.kinds.neighbours)
        if q.novelty is not None:
            base["novelty"] = q.novelty
        if q.reason is not None:
            self._reject(st, attempt, "question", q.reason, text=q_out.text, **q.detail, **base)
            return
        q_vec, vote = q.vector, q.vote
        a_demos = self._demos_for(q_vec, self._other_kinds(vote[0]) if vote and g.answer_demos == "voted_kind"
                                  else frozenset())
        a_out, a_demos = await self._complete_fitting(
            a_demos, lambda ds: self.fmt.answer_prompt([(d["prompt"], d["response"]) for d in ds], question),
            max_tokens=g.max_answer_tokens, stop=self.fmt.answer_stops(), temperature=g.temperature,
            top_p=g.top_p, seed=request_seed(g.seed, self.iteration, attempt, 1))
        if a_out is None:
            self._reject(st, attempt, "answer", "prompt_too_long", question=question, **base)
            return
        st.answer.add(a_out)
        answer = self.fmt.parse_answer(a_out.text)
        base["answer_demo_ids"] = [d["id"] for d in a_demos]
        base["generated_by"]["answer"] = _provenance(a_out)
        a = check_answer(answer, truncated=a_out.finish_reason == "length", demos=[d["response"] for d in a_demos],
                         cfg=f, kinds=self.kinds, asked=question, question=q, dups=self.dups, index=self.index)
        if a.record is not None:
            base["kind"] = a.record
        if a.reason is not None:
            self._reject(st, attempt, "answer", a.reason, question=question, text=a_out.text, **base)
            return
        if len(st.accepted) >= self.target:
            st.surplus += 1  # finished after the target was met by others: not needed, not a rejection
            return
        # From here to the end no await: check-and-add is atomic among the concurrent attempts.
        row = {"id": sample_id("generated", question, answer), "iteration": self.iteration, "attempt": attempt,
               "prompt": question, "response": answer, **base,
               "tokens": {"question_prompt": q_out.prompt_tokens, "question": q_out.completion_tokens,
                          "answer_prompt": a_out.prompt_tokens, "answer": a_out.completion_tokens},
               "seconds": round(time.perf_counter() - t0, 3)}
        append_jsonl(self.gen_path, row)
        st.accepted.append(row)
        self.index.add([_as_sample(row)], q_vec[None, :])
        if self.kinds is not None:
            self.item_kinds[row["id"]] = a.kind
        if len(st.accepted) % SAVE_INDEX_EVERY == 0:
            self.index.save()
        self.events.emit("accepted", iteration=self.iteration, id=row["id"], accepted=len(st.accepted),
                         target=self.target, attempt=attempt, busy=self.client.in_flight,
                         slots=self.client.capacity)

    # -- the phase -------------------------------------------------------
    async def run(self) -> dict:
        st = self._load()
        if self.kinds is not None:  # after _load: the samples a crash kept out of the index are back in it
            items = self.index.items
            self.item_kinds = dict(zip((it["id"] for it in items), self.kinds.kind_of([it["response"] for it in items])))
        resumed = len(st.accepted)
        started = time.perf_counter()
        self.events.emit("generation_started", iteration=self.iteration, target=self.target,
                         resumed_accepted=len(st.accepted), resumed_attempts=st.attempts)

        in_flight = 0
        done = asyncio.Event()

        def wanted() -> int:
            # Attempts worth having in flight: what is still missing over the acceptance rate so
            # far (optimistic 0.5 at first), so the last accepted sample does not leave a crowd of
            # surplus requests behind it.
            finished = len(st.accepted) + len(st.rejected)
            rate = max(0.2, len(st.accepted) / finished) if finished >= 4 else 0.5
            return int(np.ceil((self.target - len(st.accepted)) / rate))

        exited = 0

        async def worker() -> None:
            nonlocal in_flight, exited
            try:
                while len(st.accepted) < self.target and st.attempts < self.max_attempts:
                    if in_flight >= wanted():
                        await asyncio.sleep(0.05)
                        continue
                    attempt = st.attempts
                    st.attempts += 1
                    in_flight += 1
                    try:
                        await self._attempt(st, attempt)
                    finally:
                        in_flight -= 1
            except BaseException:
                done.set()  # an error: the phase must end and say why, not wait forever
                raise
            exited += 1
            # The target met: what is still in flight is surplus. The budget spent: the attempts still in
            # flight are within it (and may be accepted), so the phase ends when the last of them does.
            if len(st.accepted) >= self.target or exited == len(workers):
                done.set()

        workers = [asyncio.create_task(worker()) for _ in range(self.client.capacity)]
        await done.wait()
        # Target met, budget spent, or an error: requests still in flight are not needed. Cancelling is
        # safe: an attempt records its result without awaiting, so it is never cut mid-write.
        for w in workers:
            w.cancel()
        results = await asyncio.gather(*workers, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        if errors:
            self.index.save()
            raise errors[0]
        self.index.save()
        seconds = time.perf_counter() - started
        stats = {
            "iteration": self.iteration, "target": self.target, "accepted": len(st.accepted),
            "rejected": len(st.rejected), "attempts": len(st.accepted) + len(st.rejected),
            "acceptance_rate": round(len(st.accepted) / max(1, len(st.accepted) + len(st.rejected)), 3),
            "rejected_by_reason": dict(st.reasons), "surplus": st.surplus,
            "accepted_by_kind": dict(sorted(Counter(str(r["kind"]["answer"]) for r in st.accepted if "kind" in r).items())),
            "samples_by_model": _count_by(st, "model"), "samples_by_endpoint": _count_by(st, "endpoint"),
            "seconds_this_session": round(seconds, 2),
            "accepted_per_minute": round(60 * (len(st.accepted) - resumed) / seconds, 1) if seconds else None,
            "question_stage": st.question.summary(seconds), "answer_stage": st.answer.summary(seconds),
            "budget_exhausted": len(st.accepted) < self.target,
        }
        self.events.emit("generation_finished", **stats)
        return stats


def _provenance(c) -> dict:
    """Which server wrote a text, and as what model: the name it answered with (the run serves each model
    under its label, `garden/iter-01`) and its URL."""
    return {"model": c.model, "endpoint": c.endpoint}


def _count_by(st: IterationState, key: str) -> dict:
    """Accepted and rejected samples per generating model (or endpoint): a sample counts under the server
    that wrote its last text (its answer; a question rejected before an answer was asked: the question)."""
    counts: dict = {}
    for outcome, rows in (("accepted", st.accepted), ("rejected", st.rejected)):
        for r in rows:
            made = r.get("generated_by") or {}
            last = made.get("answer") or made.get("question") or {}
            counts.setdefault(last.get(key) or "unrecorded", Counter())[outcome] += 1  # rows of an older isara
    return {name: {"accepted": c["accepted"], "rejected": c["rejected"]} for name, c in sorted(counts.items())}


def _as_sample(row: dict) -> Sample:
    return Sample(id=row["id"], prompt=row["prompt"], response=row["response"], source="generated")
