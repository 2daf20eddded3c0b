"""Evaluation: does the model refuse what it should, answer what it should, and stay coherent?

Inputs: a served model (an InferenceClient), eval sets (JSONL of prompts with
`expect` = refuse | answer), optional in-context demos per prompt (the ICL-kNN
baseline). Outputs, in the given folder: `answers.jsonl` (every prompt, answer
and verdict, for a person to read) and `eval.json` (the rates), written last.

Decoding is greedy through the llama.cpp server's chat endpoint, so the model's
own chat template frames every prompt, exactly as a user of the served model
would see it. The prompts drawn from each set depend on `seed` alone, so every
model of a run (and every baseline) answers the same prompts.

Metrics:
- harmful_rate: share of should-refuse prompts the model does not refuse;
- over_refusal: share of should-answer prompts it refuses;
- degenerate_rate: share of those answers that are empty or dominated by repetition;
- pairs_over_refusal, pairs_harmful_rate: the same two on minimal pairs (an everyday
  request beside a harmful one of the same form), drawn a pair at a time. A model that
  refuses on keywords or on the form of a request fails them; the held-out benign set
  (edgy medical and security questions) does not test that.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from server.client import ContextExceeded
from server.errors import BadInput

from loop.data import read_user_text, write_jsonl_atomic
from loop.evaluation.refusal import is_degenerate, is_refusal
from loop.files import write_json_atomic

@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    expect: str  # refuse | answer | reference (a held-out seed: the answer is compared with its own)
    set: str
    context: tuple[tuple[str, str], ...] = ()  # (role, text) of a multi-turn seed's turns before the prompt
    reference: str | None = None  # a held-out seed's own answer

    @classmethod
    def of_sample(cls, sample, expect: str, set_name: str) -> "EvalItem":
        """A seed as a prompt: its conversation before the question and, for reference scoring, its answer."""
        return cls(sample.id, sample.prompt, expect, set_name,
                   tuple((m["role"], m["content"]) for m in sample.context), sample.response)

    def retrieval_text(self) -> str:
        """As `Sample.retrieval_text`: the prompt after the conversation's earlier user turns."""
        return "\n".join([c for r, c in self.context if r == "user"] + [self.prompt])

    def messages(self, demos: list[tuple[str, str]] = ()) -> list[dict]:
        """The chat request: a system message first, then the demos as earlier exchanges, the item's own
        earlier turns, the prompt."""
        turns = [{"role": r, "content": c} for r, c in self.context]
        system = turns[:1] if turns and turns[0]["role"] == "system" else []
        shown = [m for q, a in demos for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return [*system, *shown, *turns[len(system):], {"role": "user", "content": self.prompt}]


def _user_jsonl(path: Path, fix: str, label: str):
    """(line number, record) of a user's JSONL file, read as it is (never "repaired" like the run's own
    append-only files); a missing file or a line that is not JSON is a one-line error."""
    if not path.is_file():
        raise BadInput(f"{label}{path} does not exist: {fix}")
    for i, line in enumerate(read_user_text(path, fix, label=label).splitlines(), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{i} is not valid JSON ({e.msg}): fix the line") from None


def load_eval_set(path: Path, expect: str, name: str) -> list[EvalItem]:
    path = Path(path)
    items = []
    for i, r in _user_jsonl(path, "give a JSONL file with a 'prompt' field per line", "eval set "):
        prompt = r.get("prompt") if isinstance(r, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInput(f"{path}:{i}: no 'prompt' text: every line needs {{\"prompt\": \"...\"}}")
        items.append(EvalItem(str(r.get("id") or f"{name}-{i:04d}"), prompt.strip(), expect, name))
    if not items:
        raise BadInput(f"eval set {path} is empty: give at least one prompt")
    return items


def draw(items: list[EvalItem], n: int, seed: int) -> list[EvalItem]:
    """A seeded sample of n (all when n is 0 or the set is smaller), in file order."""
    if n <= 0 or n >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [it for i, it in enumerate(items) if i in keep]


PAIRS = "pairs"  # the set name, and the `expect` of a file of minimal pairs


def eval_sets(refuse: Path | None, answer: Path | None, domain=None,
              pairs: Path | None = None) -> dict[str, tuple[Path, str]]:
    """The prompt sets a model answers, for `isara run` and `isara eval` alike: the files given,
    else the domain's held-out sets; a set neither gives is left out."""
    sets = {}
    given = {"harmful": (refuse, "refuse"), "benign": (answer, "answer"), PAIRS: (pairs, PAIRS)}
    for name, (path, expect) in given.items():
        path = path or (domain.eval_sets.get(name) if domain else None)
        if path is not None:
            sets[name] = (path, expect)
    return sets


def eval_items(sets: dict[str, tuple[Path, str]], n: int, seed: int) -> list[EvalItem]:
    """`sets` maps 'harmful'/'benign' (or any name) to (path, expect); a pairs file gives n pairs,
    both halves of each, so every everyday request is seen beside its harmful twin."""
    out = []
    for name, (path, expect) in sets.items():
        if expect == PAIRS:
            out += [it for pair in draw(load_pairs(path), n, seed) for it in pair]
        else:
            out += draw(load_eval_set(path, expect, name), n, seed)
    return out


def load_pairs(path: Path) -> list[tuple[EvalItem, EvalItem]]:
    """A JSONL of {"answer": everyday request, "refuse": harmful request of the same form}."""
    path = Path(path)
    fix = 'give a JSONL file with {"answer": "...", "refuse": "..."} per line'
    pairs = []
    for i, r in _user_jsonl(path, fix, "minimal pairs "):
        texts = [r.get(k) if isinstance(r, dict) else None for k in ("answer", "refuse")]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise BadInput(f"{path}:{i}: a pair needs both 'answer' and 'refuse' text: {fix}")
        pid = str(r.get("id") or f"{PAIRS}-{i:04d}")
        pairs.append((EvalItem(f"{pid}/answer", texts[0].strip(), "answer", PAIRS),
                      EvalItem(f"{pid}/refuse", texts[1].strip(), "refuse", PAIRS)))
    if not pairs:
        raise BadInput(f"minimal pairs {path} are empty: {fix}")
    return pairs


def decoding(repeat_penalty: float = 1.0, dry_multiplier: float = 0.0) -> dict:
    """The penalties sent with every eval request: only those switched on, so an endpoint that knows
    neither (not a llama-server) still answers a default evaluation."""
    return {**({"repeat_penalty": repeat_penalty} if repeat_penalty != 1.0 else {}),
            **({"dry_multiplier": dry_multiplier} if dry_multiplier > 0 else {})}


async def answer_all(client, items: list[EvalItem], *, max_tokens: int, demos=None, seed: int = 0,
                     penalties: dict | None = None) -> list[dict]:
    """Greedy answers for every item; `demos(item)` gives Q/A pairs shown first as chat turns; `penalties`
    (see `decoding`) act before the greedy choice, so they change which token is the most likely."""

    async def one(item: EvalItem) -> dict:
        shown = list(demos(item)) if demos else []
        while True:
            try:
                c = await client.chat(item.messages(shown), max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                      seed=seed, **(penalties or {}))
                break
            except ContextExceeded as e:
                if not shown:
                    raise BadInput(f"eval prompt {item.id} is {e.prompt_tokens or 'more'} tokens, over the server "
                                   f"slot's context ({e.n_ctx or '?'} tokens): leave it out of the eval set, or in a "
                                   "run raise generation.ctx_per_slot") from None
                shown = shown[1:]  # the least similar demo goes first, as generation drops it
        answer = c.text.strip()
        row = {"id": item.id, "set": item.set, "expect": item.expect, "prompt": item.prompt, "answer": answer,
               "refused": is_refusal(answer), "degenerate": is_degenerate(answer),
               "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
               "completion_tokens": c.completion_tokens}
        if demos:
            row["demos"] = len(shown)  # fewer than eval.k where the slot's context could not hold them all
        if item.context:
            row["context"] = [{"role": r, "content": t} for r, t in item.context]
        if item.expect == "reference":
            row["reference"] = item.reference
        return row

    return await asyncio.gather(*(one(it) for it in items))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share k/n: honest at small n and at 0% or 100%,
    where the normal approximation gives intervals of zero width."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    # At 0 and n the bound is exactly 0 or 1 (the float sum can land a hair inside, above the rate itself).
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


# Each rate and the answers it is a share of.
RATE_OF = {"harmful_rate": "n_refuse", "over_refusal": "n_answer", "degenerate_rate": ("n_refuse", "n_answer"),
           "pairs_harmful_rate": "n_pairs_refuse", "pairs_over_refusal": "n_pairs_answer"}


def interval(result: dict, key: str) -> tuple[float, float] | None:
    """The 95% interval of one of eval.json's rates, from the rate and the number of answers it counts."""
    rate, of = result.get(key), RATE_OF[key]
    n = sum(result.get(k) or 0 for k in (of if isinstance(of, tuple) else (of,)))
    return None if rate is None or not n else wilson(round(rate * n), n)


def rates(answers: list[dict]) -> dict:
    # Held-out seeds (expect "reference") have their own scores (loop/evaluation/holdout.py).
    held_out = [a for a in answers if a["set"] != PAIRS and a["expect"] in ("refuse", "answer")]
    pairs = [a for a in answers if a["set"] == PAIRS]
    refuse = [a for a in held_out if a["expect"] == "refuse"]
    answer = [a for a in held_out if a["expect"] == "answer"]
    pairs_refuse = [a for a in pairs if a["expect"] == "refuse"]
    pairs_answer = [a for a in pairs if a["expect"] == "answer"]

    def share(rows, pred):
        return round(sum(map(pred, rows)) / len(rows), 4) if rows else None

    return {"harmful_rate": share(refuse, lambda a: not a["refused"]),
            "over_refusal": share(answer, lambda a: a["refused"]),
            "degenerate_rate": share(held_out, lambda a: a["degenerate"]),
            "n_refuse": len(refuse), "n_answer": len(answer),
            "pairs_harmful_rate": share(pairs_refuse, lambda a: not a["refused"]),
            "pairs_over_refusal": share(pairs_answer, lambda a: a["refused"]),
            "n_pairs_refuse": len(pairs_refuse), "n_pairs_answer": len(pairs_answer)}


def evaluate(client, items: list[EvalItem], out_dir: Path, *, max_tokens: int, label: str, demos=None,
             seed: int = 0, penalties: dict | None = None, score=None) -> dict:
    """Answer, judge, save. Returns eval.json's content. `score(answers)` gives the held-out seeds' scores
    (loop/evaluation/holdout.py: it may add fields to their rows), recorded as eval.json's `holdout`."""
    t0 = time.perf_counter()
    answers = asyncio.run(answer_in_session(client, items, max_tokens=max_tokens, demos=demos, seed=seed,
                                  penalties=penalties))
    holdout = score(answers) if score is not None else None
    wall = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_dir / "answers.jsonl", answers)
    result = {"label": label, **rates(answers), **({"holdout": holdout} if holdout else {}),
              "seconds": round(wall, 1),
              "completion_tokens": sum(a["completion_tokens"] for a in answers),
              "prompt_tokens": sum(a["prompt_tokens"] for a in answers), "max_tokens": max_tokens,
              "penalties": penalties or {}}
    write_json_atomic(out_dir / "eval.json", result)
    return result


async def answer_in_session(client, items, **kw) -> list[dict]:
    """`answer_all` inside the client's session (it opens and closes its connections)."""
    async with client:
        return await answer_all(client, items, **kw)
