"""A run: the folder, its configuration, its phases, and resuming it.

    runs/<name>/
      config.toml        the resolved configuration (all defaults filled in)
      seeds.jsonl        the validated seeds, with ids
      pool.jsonl         the validated external pool, when there is one
      state.json         finished phases, with checksums of what they wrote
      events.jsonl       every event, one a line
      index.usearch      the retrieval index (+ index.items.jsonl)
      iter-NN/generated.jsonl, rejected.jsonl, stats.json
      iter-NN/adapter/, model.gguf, export.json      (training on)
      iter-NN/answers.jsonl, eval.json               (evaluation on)
      baselines/{base,icl-knn,sft-seeds}/answers.jsonl, eval.json
      report.md, report.png

Running the same run again resumes it: finished phases are skipped (their
files checked), an unfinished generation phase continues from its files.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tomllib
from pathlib import Path

from server.client import Endpoint, InferenceClient
from server.errors import BadInput
from server.process import ManagedServer, ServerSettings
from server.supervisor import Supervisor

from loop.config import RunConfig, load_config, to_toml
from loop.data import Sample, load_samples, read_jsonl, write_jsonl_atomic
from loop.domains import load_domain
from loop.evaluate import EvalItem, eval_items, evaluate
from loop.export import count_params, export_iteration, preflight
from loop.files import sweep_stale_temps, write_json_atomic, write_text_atomic
from loop.generate import GenerationPhase
from loop.models import resolve_model
from loop.report import write_report
from loop.retrieval import DomainIndex, Embedder, ensure_indexed
from loop.state import Events, RunState
from loop.train import train


def run_dir_for(cfg: RunConfig) -> Path:
    if not cfg.name:
        raise BadInput("the run has no name: pass --name NAME or set name in the config")
    runs = cfg.runs_dir.resolve()
    d = (runs / cfg.name).resolve()
    if d.parent != runs:  # the name validator already refuses '/', this is the belt to its braces
        raise BadInput(f"run name {cfg.name!r} escapes the runs folder {runs}: use a plain name")
    return d


def prepare(config_path: Path | None, overrides: list[str], name: str | None) -> tuple[RunConfig, Path]:
    """Resolve the configuration of a new or existing run.

    An existing run's own config.toml is the truth (so a resume never changes
    how the run is made by accident); `--set` overrides still apply on top,
    e.g. `--set iterations=3` to extend a finished run.
    """
    if config_path is not None and Path(config_path).is_dir() and (Path(config_path) / "config.toml").is_file():
        run_dir = Path(config_path).resolve()
        cfg = load_config(run_dir / "config.toml", overrides, base_dir=run_dir)
        cfg.name, cfg.runs_dir = run_dir.name, run_dir.parent
        return cfg, run_dir
    extra = [f"name={_toml_str(name)}"] if name else []
    cfg = load_config(config_path, [*overrides, *extra])
    run_dir = run_dir_for(cfg)
    if (run_dir / "config.toml").is_file():
        stored = load_config(run_dir / "config.toml", [*overrides, *extra], base_dir=run_dir)
        stored.runs_dir = cfg.runs_dir
        return stored, run_dir
    return cfg, run_dir


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"can't write to {run_dir} ({e.strerror}): choose a writable runs_dir "
                       "(--set runs_dir=PATH)") from None


def _write_config(cfg: RunConfig, run_dir: Path) -> None:
    path = run_dir / "config.toml"
    text = to_toml(cfg)
    tomllib.loads(text)  # never write a config the next resume can't read
    write_text_atomic(path, text)


def load_run_samples(path: Path, source: str) -> list[Sample]:
    """Samples a run wrote (its seeds, pool or an iteration's generated.jsonl), tagged with where they came from."""
    return [Sample(id=r["id"], prompt=r["prompt"], response=r["response"], source=source,
                   meta=r.get("meta", {})) for r in read_jsonl(path)]


def execute(cfg: RunConfig, run_dir: Path, *, output: str = "plain", sink=None) -> dict:
    """Run (or resume) every phase; returns the per-iteration stats."""
    _writable(run_dir)
    sweep_stale_temps(run_dir)  # what a killed run was writing when it died: never whole, never read
    state = RunState(run_dir)
    events = Events(run_dir / "events.jsonl", mode=output, sink=sink)
    _write_config(cfg, run_dir)
    state.set_status("running", pid=os.getpid())
    events.emit("run_started", run=cfg.name, folder=str(run_dir), iterations=cfg.iterations)

    domain = load_domain(cfg.domain, log=lambda m: events.emit("message", text=m)) if cfg.domain else None
    # Seeds and pool: validated once, then the run's own copies are the truth.
    if not state.done("seeds"):
        state.begin("seeds")
        seeds = load_samples(cfg.data.seeds or domain.seeds, max_chars=cfg.data.max_chars)
        write_jsonl_atomic(run_dir / "seeds.jsonl", [s.to_json() for s in seeds])
        files = [run_dir / "seeds.jsonl"]
        if domain is not None:  # where the built-in data came from: package, version, file, licence
            write_json_atomic(run_dir / "domain.json", domain.sources)
            files.append(run_dir / "domain.json")
        if cfg.data.pool is not None:
            pool = load_samples(cfg.data.pool, source="pool", max_chars=cfg.data.max_chars, min_count=1)
            write_jsonl_atomic(run_dir / "pool.jsonl", [s.to_json() for s in pool])
            files.append(run_dir / "pool.jsonl")
        state.finish("seeds", files, {"seeds": len(seeds)})
    seeds = load_run_samples(run_dir / "seeds.jsonl", "seed")
    pool = load_run_samples(run_dir / "pool.jsonl", "pool")

    base = resolve_model(cfg.model.base)
    embedder_model = resolve_model(cfg.model.embedder)
    if embedder_model.embedder_dir is None:
        raise BadInput(f"{cfg.model.embedder} is not an embedding model: set model.embedder to a "
                       "sentence-transformers model (default all-minilm-l6-v2)")
    if base.gguf is None and not cfg.generation.endpoints:
        raise BadInput(f"{cfg.model.base} has no GGUF to serve: give a .gguf file or a catalog chat model")

    items = _eval_items(cfg, domain)
    phases = [f"iter-{t:02d}/{name}" for t in range(1, cfg.iterations + 1) for name in _phase_names(cfg, items)]
    phases += _baseline_phases(cfg, items)
    if all(state.done(p) for p in phases):  # nothing to do: don't load the embedder or start a server
        for p in phases:
            events.emit("phase_skipped", phase=p)
        return _finish(cfg, run_dir, state, events)
    params = None
    if cfg.train.enabled:
        if base.hf_dir is None:
            raise BadInput(f"{cfg.model.base} has no HF checkpoint to train: use a catalog model "
                           "(isara models pull NAME) or an HF folder, or set train.enabled = false")
        params = count_params(base.hf_dir)
        preflight(base.hf_dir, run_dir, params)  # fail now, not after training

    embedder = Embedder(embedder_model.embedder_dir)
    index = DomainIndex.open(run_dir, embedder.dim)
    added = ensure_indexed(index, embedder, seeds)
    for t in range(1, cfg.iterations + 1):
        added += ensure_indexed(index, embedder, load_run_samples(run_dir / f"iter-{t:02d}" / "generated.jsonl",
                                                                     "generated"))
    added += ensure_indexed(index, embedder, pool)
    index.save()
    events.emit("index_ready", items=len(index), embedded_now=added)

    server = _Serving(cfg, run_dir, events)
    try:
        if _baseline_phases(cfg, items):
            _baselines(cfg, run_dir, state, events, server, base, params, seeds, index, embedder, items)
        for t in range(1, cfg.iterations + 1):
            it_dir = run_dir / f"iter-{t:02d}"
            # The model of iteration t-1 generates iteration t (the base model for t = 1).
            prev = state.stats(f"iter-{t - 1:02d}/export") if t > 1 else {}
            model = run_dir / prev["serve_model"] if prev else base.gguf
            lora = [run_dir / p for p in prev.get("serve_lora", [])]

            phase = f"iter-{t:02d}/generate"
            if state.done(phase):
                events.emit("phase_skipped", phase=phase)
            else:
                state.begin(phase)
                server.ensure(model, lora)
                # Anchors: the domain set as it stood when this iteration began (seeds, then accepted
                # samples of earlier iterations); never the pool, never this iteration's own samples.
                current = _generated_ids(run_dir, first=t)
                anchors = [k for k, it in enumerate(index.items)
                           if it["source"] == "seed" or (it["source"] == "generated" and it["id"] not in current)]
                stats = asyncio.run(_generate(cfg, t, it_dir, index, embedder, server, anchors, events))
                stats["model"] = str(model)
                # Data scaling ratio (the paper's): accepted generated samples so far over seeds.
                so_far = sum(len(read_jsonl(run_dir / f"iter-{i:02d}" / "generated.jsonl")) for i in range(1, t + 1))
                stats["scaling_ratio"] = round(so_far / len(seeds), 3)
                write_json_atomic(it_dir / "stats.json", stats)
                state.finish(phase, [it_dir / "generated.jsonl", it_dir / "rejected.jsonl", it_dir / "stats.json"],
                             stats)
            if not cfg.train.enabled:
                continue
            server.stop()  # training wants the cores and the memory

            phase = f"iter-{t:02d}/train"
            if state.done(phase):
                events.emit("phase_skipped", phase=phase)
            else:
                state.begin(phase)
                samples = seeds + [s for i in range(1, t + 1) for s in
                                   load_run_samples(run_dir / f"iter-{i:02d}" / "generated.jsonl", "generated")]
                previous = run_dir / f"iter-{t - 1:02d}" / "adapter" if cfg.train.start_from == "previous" and t > 1 \
                    else None
                _train_phase(cfg, run_dir, state, events, phase, base, samples, it_dir, t, previous)

            phase = f"iter-{t:02d}/export"
            if state.done(phase):
                events.emit("phase_skipped", phase=phase)
            else:
                _export_phase(cfg, run_dir, state, events, phase, base, params, it_dir, t)

            phase = f"iter-{t:02d}/eval"
            if not items:
                continue
            if state.done(phase):
                events.emit("phase_skipped", phase=phase)
            else:
                exp = state.stats(f"iter-{t:02d}/export")
                server.ensure(run_dir / exp["serve_model"], [run_dir / p for p in exp.get("serve_lora", [])])
                _eval_phase(cfg, run_dir, state, events, server, phase, it_dir, items, f"iter-{t:02d}")
    finally:
        server.stop()
        index.save()
    return _finish(cfg, run_dir, state, events)


def _rel(path: Path, run_dir: Path) -> str:
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _phase_names(cfg: RunConfig, items: list[EvalItem]) -> list[str]:
    if not cfg.train.enabled:
        return ["generate"]
    return ["generate", "train", "export", "eval"] if items else ["generate", "train", "export"]


def _train_phase(cfg, run_dir, state, events, phase, base, samples, out_dir, t, previous=None) -> None:
    events.emit("train_started", iteration=t, samples=len(samples), backend=cfg.train.backend)
    result = train(base.hf_dir, samples, cfg.train, out_dir / "adapter", previous_adapter=previous,
                   on_step=lambda st: events.emit("train_step", iteration=t, **st))
    summary = {**result.summary(), "samples": len(samples)}
    events.emit("train_finished", iteration=t, **summary)
    state.finish(phase, sorted((out_dir / "adapter").glob("adapter_*")), summary)


def _export_phase(cfg, run_dir, state, events, phase, base, params, out_dir, t) -> None:
    state.begin(phase)
    events.emit("export_started", iteration=t, mode=cfg.export.mode)
    exported = export_iteration(
        base_hf=base.hf_dir, base_gguf=base.gguf, adapter_dir=out_dir / "adapter", out_dir=out_dir,
        cfg=cfg.export, params=params, on_step=lambda st: events.emit("export_step", iteration=t, **st))
    train_phase = phase.rsplit("/", 1)[0] + "/train"
    info = {**exported.to_json(), "iteration": t, "base": cfg.model.base,
            "samples": state.stats(train_phase).get("samples"),
            "config_sha256": hashlib.sha256(to_toml(cfg).encode()).hexdigest()}
    # Paths inside the run are kept relative: a run folder can be moved or copied whole.
    info["serve_model"] = _rel(exported.serve_model, run_dir)
    info["serve_lora"] = [_rel(p, run_dir) for p in exported.serve_lora]
    write_json_atomic(out_dir / "export.json", info)
    events.emit("export_finished", **info)
    written = [p for p in (exported.serve_model, *exported.serve_lora) if p.is_relative_to(run_dir)]
    state.finish(phase, [*written, out_dir / "export.json"], info)


# --- evaluation and baselines --------------------------------------------------

def _eval_items(cfg: RunConfig, domain) -> list[EvalItem]:
    """The prompts every model of the run answers: the configured sets, else the domain's."""
    if not cfg.eval.enabled:
        return []
    if cfg.generation.endpoints:  # they serve their own model, not this run's: evaluating them would mislead
        return []
    sets = {}
    refuse = cfg.eval.refuse_prompts or (domain.eval_sets["harmful"] if domain else None)
    answer = cfg.eval.answer_prompts or (domain.eval_sets["benign"] if domain else None)
    if refuse is not None:
        sets["harmful"] = (refuse, "refuse")
    if answer is not None:
        sets["benign"] = (answer, "answer")
    return eval_items(sets, cfg.eval.n, cfg.eval.seed) if sets else []


def _baseline_phases(cfg: RunConfig, items: list[EvalItem]) -> list[str]:
    if not items or not cfg.eval.baselines:
        return []
    phases = ["baselines/base/eval", "baselines/icl-knn/eval"]
    if cfg.train.enabled:
        phases += ["baselines/sft-seeds/train", "baselines/sft-seeds/export", "baselines/sft-seeds/eval"]
    return phases


def _eval_phase(cfg, run_dir, state, events, server, phase, out_dir, items, label, demos=None) -> None:
    state.begin(phase)
    events.emit("eval_started", label=label, prompts=len(items))
    result = evaluate(_client(cfg, server), items, out_dir, max_tokens=cfg.eval.max_tokens, label=label,
                      demos=demos, seed=cfg.eval.seed)
    events.emit("eval_finished", **result)
    state.finish(phase, [out_dir / "answers.jsonl", out_dir / "eval.json"], result)
    write_report(run_dir, cfg.name or run_dir.name)


def _icl_knn_demos(index: DomainIndex, embedder: Embedder, k: int, items: list[EvalItem]):
    """The k nearest seed pairs of each prompt (USearch), the nearest last, next to the question.
    All prompts are embedded in one batch up front, so nothing blocks the eval's event loop."""
    seed_keys = {key for key, it in enumerate(index.items) if it["source"] == "seed"}
    chosen = {}
    for item, v in zip(items, embedder.encode([it.prompt for it in items])):
        # Seeds are a small part of a big index (pool, generated samples): look a little wider than k,
        # and over everything only when that did not find k seeds.
        hits = [key for key, _ in index.search(v, min(len(index), max(64, 8 * k))) if key in seed_keys][:k]
        if len(hits) < min(k, len(seed_keys)):
            hits = [key for key, _ in index.search(v, len(index)) if key in seed_keys][:k]
        chosen[item] = [(index.items[key]["prompt"], index.items[key]["response"]) for key in reversed(hits)]
    return lambda item: chosen[item]


def _baselines(cfg, run_dir, state, events, server, base, params, seeds, index, embedder, items) -> None:
    """Base model, ICL-kNN and SFT on the seeds, on the same prompts as every iteration; once per run."""
    for name in ("base", "icl-knn"):
        phase = f"baselines/{name}/eval"
        if state.done(phase):
            events.emit("phase_skipped", phase=phase)
            continue
        demos = _icl_knn_demos(index, embedder, cfg.eval.k, items) if name == "icl-knn" else None
        server.ensure(base.gguf, [])
        _eval_phase(cfg, run_dir, state, events, server, phase, run_dir / "baselines" / name, items, name, demos)
    if not cfg.train.enabled:
        return
    out = run_dir / "baselines" / "sft-seeds"
    if state.done("baselines/sft-seeds/train"):
        events.emit("phase_skipped", phase="baselines/sft-seeds/train")
    else:
        server.stop()
        state.begin("baselines/sft-seeds/train")
        _train_phase(cfg, run_dir, state, events, "baselines/sft-seeds/train", base, seeds, out, 0)
    if state.done("baselines/sft-seeds/export"):
        events.emit("phase_skipped", phase="baselines/sft-seeds/export")
    else:
        _export_phase(cfg, run_dir, state, events, "baselines/sft-seeds/export", base, params, out, 0)
    if state.done("baselines/sft-seeds/eval"):
        events.emit("phase_skipped", phase="baselines/sft-seeds/eval")
    else:
        exp = state.stats("baselines/sft-seeds/export")
        server.ensure(run_dir / exp["serve_model"], [run_dir / p for p in exp.get("serve_lora", [])])
        _eval_phase(cfg, run_dir, state, events, server, "baselines/sft-seeds/eval", out, items, "sft-seeds")


def _client(cfg: RunConfig, serving: "_Serving") -> InferenceClient:
    g = cfg.generation
    if g.endpoints:
        return InferenceClient([Endpoint(u, slots=g.endpoint_slots, api_key=g.api_key) for u in g.endpoints],
                               timeout=g.request_timeout_s)
    server = serving.server
    return InferenceClient([Endpoint(server.base_url, slots=server.slots)], timeout=g.request_timeout_s,
                           supervisor=serving.supervisor)


def _finish(cfg: RunConfig, run_dir: Path, state: RunState, events: Events) -> dict:
    report = write_report(run_dir, cfg.name or run_dir.name)
    state.set_status("finished")
    events.emit("run_finished", run=cfg.name, folder=str(run_dir), report=str(report))
    return {t: state.stats(f"iter-{t:02d}/generate") for t in range(1, cfg.iterations + 1)}


class _Serving:
    """The managed server of a run: started on demand, restarted when the model changes."""

    def __init__(self, cfg: RunConfig, run_dir: Path, events: Events):
        self.cfg, self.run_dir, self.events = cfg, run_dir, events
        self.server: ManagedServer | None = None
        self.supervisor: Supervisor | None = None

    def ensure(self, model: Path, lora: list[Path]) -> None:
        if self.cfg.generation.endpoints:
            return  # external endpoints serve; nothing to manage
        if self.server is not None and self.server.alive() and self.server.settings.model == model \
                and list(self.server.settings.lora) == lora:
            return
        self.stop()
        g = self.cfg.generation
        settings = ServerSettings(model=model, lora=lora, slots=g.slots, ctx_per_slot=g.ctx_per_slot,
                                  threads=g.threads, log_path=self.run_dir / "server.log")
        self.server = ManagedServer(settings).start()
        self.supervisor = Supervisor(self.server, max_restarts=g.max_restarts, interval=g.health_interval_s,
                                     hang_after=g.hang_timeout_s, on_restart=self._restarted)
        self.events.emit("server_started", url=self.server.base_url, slots=self.server.slots,
                         backend=self.server.backend, pid=self.server.pid, model=str(model))

    def _restarted(self, restarts: int, reason: str) -> None:
        self.events.emit("server_restarted", restarts=restarts, reason=reason, pid=self.server.pid,
                         log=str(self.server.log_path))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.supervisor = None


def _generated_ids(run_dir: Path, first: int) -> set[str]:
    """Ids of the samples generated in iteration `first` and later."""
    ids = set()
    for d in run_dir.glob("iter-*"):
        if d.name[5:].isdigit() and int(d.name[5:]) >= first:
            ids |= {r["id"] for r in read_jsonl(d / "generated.jsonl")}
    return ids


async def _generate(cfg, t, it_dir, index, embedder, server, anchors, events) -> dict:
    async with _client(cfg, server) as client:
        phase = GenerationPhase(cfg=cfg, iteration=t, out_dir=it_dir, index=index, embedder=embedder,
                                client=client, anchors=anchors, events=events)
        return await phase.run()
