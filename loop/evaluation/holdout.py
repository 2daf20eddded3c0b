"""Held-out seeds: a quality number for every domain (`eval.holdout`).

A share of the seeds is set aside when a run begins (`runs/NAME/holdout.jsonl`): never trained on,
indexed, retrieved, shown as a demonstration or used to choose the run's model. Every model the run
evaluates (each iteration and each baseline) answers their questions greedily, and is scored three ways
against the seeds' own answers:

- ROUGE-L F of the answer against the reference (word overlap in order);
- the cosine of the two texts' embeddings (the run's retrieval embedder: same meaning, other words);
- the model's loss on the reference answer (mean negative log-likelihood per token, nats, teacher-forced
  on the trained weights: the base checkpoint plus the iteration's LoRA).

The first two score the served GGUF's own greedy answer, cut at `eval.max_tokens` like every eval answer
(so a longer reference caps ROUGE-L's recall alike for every model); the loss needs no generation and says
how likely the model finds the answer the domain's author wrote. Means come with a 95% t-interval over the
held-out seeds: with a few of them, read the interval before the number.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from loop.data import MIN_SEEDS, Sample
from loop.evaluation.evaluate import EvalItem

HOLDOUT = "holdout"  # the eval set's name, in answers.jsonl
REFERENCE = "reference"  # its `expect`


def holdout_split(seeds: list[Sample], share: float, seed: int,
                  total: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): ceil(share x total) of `seeds` (`total`: all the seeds, where some were already set
    aside) drawn at random with `seed`, leaving at least MIN_SEEDS to train on; both in file order."""
    # round(): 0.07 x 100 is 7.000000000000001 in floats, and must hold out 7, not 8
    want = math.ceil(round(share * (total or len(seeds)), 9)) if share > 0 else 0
    n = min(want, max(0, len(seeds) - MIN_SEEDS))
    held = set(random.Random(seed).sample(range(len(seeds)), n))
    return [s for i, s in enumerate(seeds) if i not in held], [s for i, s in enumerate(seeds) if i in held]


def holdout_items(samples: list[Sample]) -> list[EvalItem]:
    return [EvalItem.of_sample(s, REFERENCE, HOLDOUT) for s in samples]


def score_answers(answers: list[dict], embed) -> dict | None:
    """Adds `rouge_l` and `cosine` to each held-out answer row (in place); returns their means and
    intervals, or None when there are none. `embed(texts)` gives unit-length vectors."""
    rows = [a for a in answers if a["set"] == HOLDOUT]
    if not rows:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    vectors = embed([a["answer"] for a in rows] + [a["reference"] for a in rows])
    for a, u, v in zip(rows, vectors[:len(rows)], vectors[len(rows):]):
        a["rouge_l"] = round(scorer.score(a["reference"], a["answer"])["rougeL"].fmeasure, 4)
        a["cosine"] = round(float(u @ v), 4)
    out = {"n": len(rows)}
    for key, bounds in (("rouge_l", (0.0, 1.0)), ("cosine", (-1.0, 1.0))):
        out[key], out[f"{key}_interval"] = mean_interval([a[key] for a in rows], bounds)
    out["degenerate_rate"] = round(sum(a["degenerate"] for a in rows) / len(rows), 4)
    return out


def cell(h: dict | None) -> str:
    """`0.31 / 0.72 / 1.85`: the mean ROUGE-L F, embedding cosine and loss (nats per token), as tables show them."""
    if not h:
        return "-"
    return " / ".join("-" if h.get(k) is None else f"{h[k]:.2f}" for k in ("rouge_l", "cosine", "loss"))


def scorer(embed, loss=None):
    """`evaluate`'s `score`: the answers' similarity to their references, and `loss()` (the model's loss on
    them) where given."""
    def score(answers: list[dict]) -> dict | None:
        out = score_answers(answers, embed)
        if out is not None and loss is not None:
            t0 = time.perf_counter()
            out["loss"] = loss()
            out["loss_seconds"] = round(time.perf_counter() - t0, 1)
        return out

    return score


def mean_interval(values: list[float], bounds: tuple[float, float] = (-math.inf, math.inf)
                  ) -> tuple[float, list[float] | None]:
    """The mean and its 95% Student-t interval, within the score's own range (None for a single value).
    With two held-out seeds t has one degree of freedom (12.7 standard errors): the interval says so."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return round(mean, 4), None
    from scipy.stats import t

    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = t.ppf(0.975, n - 1) * sd / n ** 0.5
    return round(mean, 4), [round(max(bounds[0], mean - half), 4), round(min(bounds[1], mean + half), 4)]


def reference_loss(hf_dir: Path, adapter: Path | None, items: list[EvalItem], demos=None,
                   params: int | None = None) -> float | None:
    """Mean negative log-likelihood per token (nats) of each held-out item's reference answer, after the
    conversation the eval showed (its demos, for ICL-kNN), on the base checkpoint plus `adapter`. Only the
    answer is scored; nothing is cut."""
    items = [it for it in items if it.reference is not None and it.set == HOLDOUT]
    if not items:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from loop.models.memory import BF16_ABOVE
    from loop.training.common import IGNORE, encode_example

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    from server.toolchain import cuda_available

    device = "cuda" if cuda_available() and torch.cuda.is_available() else "cpu"
    big = params is not None and params > BF16_ABOVE  # half the memory for a big model, as derive keeps it
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if big else torch.float32,
                                                 use_safetensors=True, trust_remote_code=False).to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for it in items:
            conversation = it.messages(demos(it) if demos else ())
            ex = encode_example(tok, it.prompt, it.reference, 1 << 30, conversation[:-1], loss_on="last")
            ids, labels = torch.tensor([ex["input_ids"]], device=device), torch.tensor([ex["labels"]], device=device)
            n = int((labels[:, 1:] != IGNORE).sum())
            if n:
                total += float(model(input_ids=ids, labels=labels).loss.float()) * n
                count += n
    return round(total / count, 4) if count else None


def run_holdout(run_dir: Path, iteration: int | None):
    """(items, score) for `isara eval` of a run's model: the run's held-out seeds and their scorer (the run's
    embedder; the loss of the run's base checkpoint plus that iteration's LoRA), or ([], None) for a run
    that held none out."""
    import tomllib

    from loop.data import read_jsonl
    from loop.generation.retrieval import Embedder
    from loop.layout import RunLayout
    from loop.models.convert import count_params
    from loop.models.store import prepared_base, resolve_model

    layout = RunLayout(run_dir)
    if not layout.holdout.is_file():
        return [], None
    held = [Sample(r["id"], r["prompt"], r["response"], context=r.get("context", []))
            for r in read_jsonl(layout.holdout, repair=False)]
    items = holdout_items(held)
    config = tomllib.loads(layout.config.read_text(encoding="utf-8"))
    embedder = Embedder(resolve_model(config.get("model", {}).get("embedder", "all-minilm-l6-v2")).embedder_dir)
    base = prepared_base(layout.base_model)
    hf = base.hf_dir if base is not None and base.hf_dir is not None and base.hf_dir.is_dir() else None
    adapter = layout.adapter(iteration) if iteration is not None else None
    if adapter is not None and not adapter.is_dir():
        hf = None  # the iteration's LoRA is gone: no loss, rather than the base model's under its name
    loss = (lambda: reference_loss(hf, adapter, items, params=count_params(hf))) if hf is not None else None
    return items, scorer(embedder.encode, loss)
