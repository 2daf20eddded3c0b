"""The phases of a run: each a function of the run's context, returning what it wrote.

A phase reads what earlier phases left on disk (through `RunLayout` and
`RunState`), does one job, and returns `(files, stats)`: the files it wrote,
whose checksums `state.json` records so a resume can trust them, and the
numbers it reports. `loop/run.py` lists the phases of a run and runs them in
order, skipping those already finished.

    prepare_base       base.json                                (loop/prepare.py; the first of every run)
    generate_samples   iter-NN/generated.jsonl, rejected.jsonl, stats.json
    train_adapter      iter-NN/adapter/                        (baseline: sft-seeds)
    export_gguf        iter-NN/model.gguf (or adapter GGUF), export.json
    validate_iteration iter-NN/validation.jsonl                 (held-out seeds, data.validation > 0)
    evaluate_model     iter-NN/answers.jsonl, eval.json         (baselines: base, icl-knn)
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from server.errors import BadInput

from loop.config import RunConfig, to_toml
from loop.data import Sample, read_jsonl, write_jsonl_atomic
from loop.evaluation.evaluate import EvalItem, answer_in_session, decoding, evaluate
from loop.evaluation.holdout import reference_loss, scorer
from loop.evaluation.validation import judge
from loop.events import Events
from loop.files import write_json_atomic
from loop.generation.generate import GenerationPhase
from loop.generation.kinds import AnswerKinds
from loop.generation.retrieval import DomainIndex, Embedder, ensure_indexed
from loop.layout import EXPORT, PREPARE_BASE, TRAIN, RunLayout, baseline_phase, iteration_name, matched_name, phase_name
from loop.models.convert import export_iteration
from loop.models.store import Model, prepared_base
from loop.serving import Serving
from loop.state import RunState
from loop.training.log import TrainLog
from loop.training.train import train

Written = tuple[list[Path], dict]  # what a phase returns: the files it wrote, its stats


def load_run_samples(path: Path, source: str) -> list[Sample]:
    """Samples a run wrote (its seeds, pool or an iteration's generated.jsonl), tagged with where they came from."""
    return [Sample(id=r["id"], prompt=r["prompt"], response=r["response"], source=source,
                   meta=r.get("meta", {}), context=r.get("context", [])) for r in read_jsonl(path)]


@dataclass
class RunContext:
    """What every phase may use: the run's configuration, folder, state, and the resources it opens once, when a
    phase first asks: the base model the run prepared, the embedder, the retrieval index, what serves."""
    cfg: RunConfig
    layout: RunLayout
    state: RunState
    events: Events
    seeds: list[Sample]
    items: list[EvalItem]  # the prompts every model of the run answers
    embedder_dir: Path  # model.embedder's folder

    @cached_property
    def base(self) -> Model:
        """The base model as phase base-model/prepare (loop/prepare.py) recorded it, in this session or an
        earlier one: what the run serves and trains."""
        base = prepared_base(self.layout.base_model)
        if base is None:
            raise RuntimeError(f"phase {PREPARE_BASE} has not run: the base model is not prepared")
        return base

    def forget_base(self) -> None:
        self.__dict__.pop("base", None)

    @property
    def params(self) -> int | None:
        """The base checkpoint's parameter count (training runs)."""
        return self.base.params

    @cached_property
    def embedder(self) -> Embedder:
        return Embedder(self.embedder_dir)

    @cached_property
    def index(self) -> DomainIndex:
        """The retrieval index over every domain sample (seeds, then accepted samples, then the pool), opened and
        brought up to date with what is on disk."""
        index = DomainIndex.open(self.layout.root, self.embedder.dim)
        added = ensure_indexed(index, self.embedder, self.seeds)
        for t in self.layout.iterations_on_disk():  # what earlier sessions accepted, should the saved index lack it
            # one at a time, as generation embedded each when it accepted it: texts embedded together differ in
            # the last bits (llama.cpp decodes them in one batch), and a resumed run would then pick other demos
            added += ensure_indexed(index, self.embedder, self.generated(t), each=True)
        added += ensure_indexed(index, self.embedder, load_run_samples(self.layout.pool, "pool"))
        index.save()
        self.events.emit("index_ready", items=len(index), embedded_now=added)
        return index

    @cached_property
    def serving(self) -> Serving:
        return Serving(self.cfg, self.layout, self.events, base_name=lambda: self.base.name)

    def close(self) -> None:
        """The session is over: nothing it served stays up, the index is saved whole."""
        if "serving" in self.__dict__:
            self.serving.close()
        if "index" in self.__dict__:
            self.index.save()

    def generated(self, t: int) -> list[Sample]:
        return load_run_samples(self.layout.generated(t), "generated")

    def served_by(self, export_phase: str) -> tuple[Path, list[Path]]:
        """The GGUF (and LoRA GGUFs) an export phase made, as the server loads them."""
        return self.layout.served(self.state.stats(export_phase))

    def model_before(self, t: int) -> tuple[Path, list[Path]]:
        """Iteration t generates with the model of iteration t-1: the base model for t = 1, or when
        the run does not train."""
        previous = phase_name(t - 1, EXPORT)
        return self.served_by(previous) if t > 1 and self.state.recorded(previous) else (self.base.gguf, [])


# --- what a phase needs served, set up before its clock starts ----------------------

def stop_serving(ctx: RunContext) -> None:
    ctx.serving.stop()  # training and export want the cores and the memory


def serve_base(ctx: RunContext) -> None:
    ctx.serving.ensure(ctx.base.gguf, [])


def serve_export(ctx: RunContext, export_phase: str) -> None:
    ctx.serving.ensure(*ctx.served_by(export_phase))


# --- generation ------------------------------------------------------------------

def generate_samples(ctx: RunContext, t: int) -> Written:
    model, lora = ctx.model_before(t)
    ctx.serving.ensure(model, lora)
    # Anchors: the domain set as it stood when this iteration began (seeds, then accepted samples of
    # earlier iterations); never the pool, never this iteration's own samples.
    later = {s.id for i in ctx.layout.iterations_on_disk() if i >= t for s in ctx.generated(i)}
    anchors = [k for k, it in enumerate(ctx.index.items)
               if it["source"] == "seed" or (it["source"] == "generated" and it["id"] not in later)]
    stats = asyncio.run(_generate(ctx, t, anchors, adapters=len(lora)))
    # The model this run served for it; with generation.endpoints, what those servers hold (each sample
    # records the name its server answered with: samples_by_model).
    stats["model"] = None if ctx.cfg.generation.endpoints else str(model)
    stats["served_as"] = ctx.serving.answers_as(model, lora)
    # Data scaling ratio (the paper's): accepted generated samples so far over seeds.
    so_far = sum(len(read_jsonl(ctx.layout.generated(i))) for i in range(1, t + 1))
    stats["scaling_ratio"] = round(so_far / len(ctx.seeds), 3)
    write_json_atomic(ctx.layout.stats(t), stats)
    return [ctx.layout.generated(t), ctx.layout.rejected(t), ctx.layout.stats(t)], stats


async def _generate(ctx: RunContext, t: int, anchors: list[int], adapters: int) -> dict:
    kinds = seed_answer_kinds(ctx)
    async with ctx.serving.client() as client:
        phase = GenerationPhase(cfg=ctx.cfg, iteration=t, out_dir=ctx.layout.iteration(t), index=ctx.index,
                                embedder=ctx.embedder, client=client, anchors=anchors, events=ctx.events,
                                adapters=adapters,
                                kinds=kinds)
        return await phase.run()


def seed_answer_kinds(ctx: RunContext) -> AnswerKinds:
    """The kinds of the seeds' answers (loop/generation/kinds.py), found anew from the seeds each iteration (a k-means
    over a few dozen short vectors): recorded for every sample even when no mechanism uses them."""
    keys = [k for k, it in enumerate(ctx.index.items) if it["source"] == "seed"]
    questions = np.stack([ctx.index.vector(k) for k in keys])  # embedded once, when the run indexed them
    return AnswerKinds.fit(questions, [ctx.index.items[k]["response"] for k in keys], ctx.cfg.kinds.count,
                           opening_words=ctx.cfg.kinds.opening_words, seed=ctx.cfg.generation.seed)


# --- training and export -----------------------------------------------------------

def _whose(out: Path, label: int) -> dict:
    """What a training or export event says it is of: the iteration, or (label 0) the baseline it makes."""
    return {"iteration": label, **({"baseline": out.name} if label == 0 else {})}


def train_adapter(ctx: RunContext, out: Path, samples: list[Sample], *, label: int,
                  previous: Path | None = None, round_: int | None = None, epochs: float | None = None) -> Written:
    """LoRA on `samples` into out/adapter. `label`: the iteration (0 for the SFT-on-seeds baselines);
    `round_`: which training round's learning rate (train.lr_decay), default the iteration's."""
    ctx.serving.stop()  # training wants the cores and the memory
    cfg = ctx.cfg.train
    round_ = label if round_ is None else round_
    if round_ > 1 and cfg.lr_decay != 1.0:
        cfg = cfg.model_copy(update={"learning_rate": cfg.learning_rate * cfg.lr_decay ** (round_ - 1)})
    if epochs is not None:
        cfg = cfg.model_copy(update={"epochs": epochs})
    who = _whose(out, label)
    ctx.events.emit("train_started", **who, samples=len(samples), backend=cfg.backend)
    log = TrainLog(out, cfg.report_to)

    def on_step(st: dict) -> None:
        ctx.events.emit("train_step", **who, **st)
        log.step(st)

    try:
        result = train(ctx.base.hf_dir, samples, cfg, out / "adapter", previous_adapter=previous, on_step=on_step,
                       checkpoint_dir=out / "checkpoint")
    finally:
        log.close()
    summary = {**result.summary(), "samples": len(samples)}
    ctx.events.emit("train_finished", **who, **summary)
    return sorted((out / "adapter").glob("adapter_*")), summary


def train_iteration(ctx: RunContext, t: int) -> Written:
    """Seeds plus every sample accepted so far (or this iteration's only); from the base weights, or from
    iteration t-1's adapter."""
    first = t if ctx.cfg.train.samples == "latest" else 1
    samples = ctx.seeds + [s for i in range(first, t + 1) for s in ctx.generated(i)]
    previous = ctx.layout.adapter(t - 1) if ctx.cfg.train.start_from == "previous" and t > 1 else None
    return train_adapter(ctx, ctx.layout.iteration(t), samples, label=t, previous=previous)


def export_gguf(ctx: RunContext, out: Path, *, label: int, train_phase: str) -> Written:
    """Merge (or convert the adapter), convert, verify, quantize: what the server will load, plus export.json."""
    ctx.serving.stop()
    cfg, layout = ctx.cfg, ctx.layout
    who = _whose(out, label)
    ctx.events.emit("export_started", **who, mode=cfg.export.mode)
    exported = export_iteration(
        base_hf=ctx.base.hf_dir, base_gguf=ctx.base.gguf, adapter_dir=out / "adapter", out_dir=out,
        cfg=cfg.export, params=ctx.params, on_step=lambda st: ctx.events.emit("export_step", **who, **st))
    info = {**exported.to_json(), "iteration": label, "base": cfg.model.base,
            "samples": ctx.state.stats(train_phase).get("samples"),
            "config_sha256": hashlib.sha256(to_toml(cfg).encode()).hexdigest(),
            # Paths inside the run are kept relative: a run folder can be moved or copied whole.
            "serve_model": layout.relative(exported.serve_model),
            "serve_lora": [layout.relative(p) for p in exported.serve_lora]}
    write_json_atomic(out / "export.json", info)
    ctx.events.emit("export_finished", **info, **{k: v for k, v in who.items() if k not in info})
    written = [p for p in (exported.serve_model, *exported.serve_lora) if p.is_relative_to(layout.root)]
    return [*written, out / "export.json"], info


# --- evaluation and baselines --------------------------------------------------------

def evaluate_model(ctx: RunContext, out: Path, label: str, model: Path, lora: list[Path], demos=None,
                   adapter: Path | None = None) -> Written:
    """The eval sets' answers, judged; held-out seeds scored against their own answers, with the loss of the
    trained weights (the base checkpoint plus `adapter`) on them where the run has that checkpoint."""
    ctx.serving.ensure(model, lora)
    ctx.events.emit("eval_started", label=label, prompts=len(ctx.items))
    e = ctx.cfg.eval
    hf = ctx.base.hf_dir
    loss = (lambda: reference_loss(hf, adapter, ctx.items, demos, ctx.params)) if hf is not None else None
    result = evaluate(ctx.serving.client(), ctx.items, out, max_tokens=e.max_tokens, label=label, demos=demos,
                      seed=e.seed, penalties=decoding(e.repeat_penalty, e.dry_multiplier),
                      score=scorer(ctx.embedder.encode, loss))
    ctx.events.emit("eval_finished", **result)
    return [out / "answers.jsonl", out / "eval.json"], result


def validate_iteration(ctx: RunContext, t: int) -> Written:
    """Iteration t's greedy answers to the held-out seeds' questions, judged by kind (loop/evaluation/validation.py)."""
    if not ctx.layout.validation.is_file():
        raise BadInput(f"data.validation is set but run {ctx.layout.name} held no seeds out when it began: "
                       "start a new run with it (or set data.validation = 0)")
    held = load_run_samples(ctx.layout.validation, "validation")
    items = [EvalItem.of_sample(s, "answer", "validation") for s in held]
    e = ctx.cfg.eval
    answers = asyncio.run(answer_in_session(ctx.serving.client(), items, max_tokens=e.max_tokens,
                                            penalties=decoding(e.repeat_penalty, e.dry_multiplier)))
    result = judge(seed_answer_kinds(ctx), [s.response for s in held], [a["answer"] for a in answers],
                   [a["degenerate"] for a in answers])
    rows = [{"id": a["id"], "prompt": a["prompt"], "answer": a["answer"], "reference": s.response,
             "kind": k, "wanted": w, "degenerate": a["degenerate"]}
            for a, s, k, w in zip(answers, held, result.pop("kinds"), result.pop("wanted"))]
    write_jsonl_atomic(ctx.layout.validation_answers(t), rows)
    ctx.events.emit("validation_finished", iteration=t, **result)
    return [ctx.layout.validation_answers(t)], result


def evaluate_iteration(ctx: RunContext, t: int) -> Written:
    return evaluate_model(ctx, ctx.layout.iteration(t), iteration_name(t), *ctx.served_by(phase_name(t, EXPORT)),
                          adapter=ctx.layout.adapter(t))


def evaluate_base(ctx: RunContext) -> Written:
    return evaluate_model(ctx, ctx.layout.baseline("base"), "base", ctx.base.gguf, [])


def evaluate_icl_knn(ctx: RunContext) -> Written:
    """The base model with the k nearest seed pairs of each prompt shown first: ISARA's retrieval, no training."""
    demos = icl_knn_demos(ctx.index, ctx.embedder, ctx.cfg.eval.k, ctx.items)
    return evaluate_model(ctx, ctx.layout.baseline("icl-knn"), "icl-knn", ctx.base.gguf, [], demos)


def train_sft_seeds(ctx: RunContext) -> Written:
    return train_adapter(ctx, ctx.layout.baseline("sft-seeds"), ctx.seeds, label=0)


def matched_epochs(cfg: RunConfig, n_seeds: int, t: int) -> float:
    """Epochs over the seeds alone that give as many micro-batches (so optimizer steps) as iteration t's own
    training: on the seeds plus generation.samples accepted samples (this iteration's, or every iteration's so
    far with train.samples = "all"), at train.epochs."""
    tc = cfg.train
    n_t = n_seeds + cfg.generation.samples * (t if tc.samples == "all" else 1)
    target = math.ceil(math.ceil(n_t / tc.batch_size) * tc.epochs)
    return target / math.ceil(n_seeds / tc.batch_size)


def train_sft_matched(ctx: RunContext, t: int) -> Written:
    """SFT on the seeds alone, with iteration t's optimizer steps and learning rate, continuing
    sft-matched-(t-1) where ISARA continues iteration t-1: ISARA's schedule with its samples left out."""
    previous = (ctx.layout.baseline(matched_name(t - 1)) / "adapter"
                if ctx.cfg.train.start_from == "previous" and t > 1 else None)
    return train_adapter(ctx, ctx.layout.baseline(matched_name(t)), ctx.seeds, label=0, previous=previous,
                         round_=t, epochs=matched_epochs(ctx.cfg, len(ctx.seeds), t))


def export_sft_matched(ctx: RunContext, t: int) -> Written:
    return export_gguf(ctx, ctx.layout.baseline(matched_name(t)), label=0,
                       train_phase=baseline_phase(matched_name(t), TRAIN))


def evaluate_sft_matched(ctx: RunContext, t: int) -> Written:
    name = matched_name(t)
    model, lora = ctx.served_by(baseline_phase(name, EXPORT))
    return evaluate_model(ctx, ctx.layout.baseline(name), name, model, lora,
                          adapter=ctx.layout.baseline(name) / "adapter")


def export_sft_seeds(ctx: RunContext) -> Written:
    return export_gguf(ctx, ctx.layout.baseline("sft-seeds"), label=0,
                       train_phase=baseline_phase("sft-seeds", TRAIN))


def evaluate_sft_seeds(ctx: RunContext) -> Written:
    model, lora = ctx.served_by(baseline_phase("sft-seeds", EXPORT))
    return evaluate_model(ctx, ctx.layout.baseline("sft-seeds"), "sft-seeds", model, lora,
                          adapter=ctx.layout.baseline("sft-seeds") / "adapter")


def icl_knn_demos(index: DomainIndex, embedder: Embedder, k: int, items: list[EvalItem]):
    """The k nearest seed pairs of each prompt (USearch), the nearest last, next to the question.
    All prompts are embedded in one batch up front, so nothing blocks the eval's event loop."""
    seed_keys = {key for key, it in enumerate(index.items) if it["source"] == "seed"}
    chosen = {}
    for item, v in zip(items, embedder.encode([it.retrieval_text() for it in items])):
        # Seeds are a small part of a big index (pool, generated samples): look a little wider than k,
        # and over everything only when that did not find k seeds.
        hits = [key for key, _ in index.search(v, min(len(index), max(64, 8 * k))) if key in seed_keys][:k]
        if len(hits) < min(k, len(seed_keys)):
            hits = [key for key, _ in index.search(v, len(index)) if key in seed_keys][:k]
        chosen[item] = [(index.items[key]["prompt"], index.items[key]["response"]) for key in reversed(hits)]
    return lambda item: chosen[item]
