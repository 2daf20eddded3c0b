"""A run: the folder, its configuration, its phases, and resuming it.

    runs/<name>/
      config.toml        the resolved configuration (all defaults filled in)
      seeds.jsonl        the validated seeds, with ids
      pool.jsonl         the validated external pool, when there is one
      state.json         finished phases, with checksums of what they wrote
      events.jsonl       every event, one a line
      index.usearch      the retrieval index (+ index.items.jsonl)
      iter-NN/generated.jsonl, rejected.jsonl, stats.json

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

from loop.config import RunConfig, load_config, to_toml
from loop.data import Sample, load_samples, read_jsonl, write_jsonl_atomic
from loop.export import count_params, export_iteration, preflight
from loop.files import write_json_atomic, write_text_atomic
from loop.generate import GenerationPhase
from loop.models import resolve_model
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


def _load_jsonl_samples(path: Path, source: str) -> list[Sample]:
    return [Sample(id=r["id"], prompt=r["prompt"], response=r["response"], source=source,
                   meta=r.get("meta", {})) for r in read_jsonl(path)]


def execute(cfg: RunConfig, run_dir: Path, *, output: str = "plain", sink=None) -> dict:
    """Run (or resume) every phase; returns the per-iteration stats."""
    _writable(run_dir)
    state = RunState(run_dir)
    events = Events(run_dir / "events.jsonl", mode=output, sink=sink)
    _write_config(cfg, run_dir)
    state.set_status("running", pid=os.getpid())
    events.emit("run_started", run=cfg.name, folder=str(run_dir), iterations=cfg.iterations)

    # Seeds and pool: validated once, then the run's own copies are the truth.
    if not state.done("seeds"):
        seeds = load_samples(cfg.data.seeds, max_chars=cfg.data.max_chars)
        write_jsonl_atomic(run_dir / "seeds.jsonl", [s.to_json() for s in seeds])
        files = [run_dir / "seeds.jsonl"]
        if cfg.data.pool is not None:
            pool = load_samples(cfg.data.pool, source="pool", max_chars=cfg.data.max_chars, min_count=1)
            write_jsonl_atomic(run_dir / "pool.jsonl", [s.to_json() for s in pool])
            files.append(run_dir / "pool.jsonl")
        state.finish("seeds", files, {"seeds": len(seeds)})
    seeds = _load_jsonl_samples(run_dir / "seeds.jsonl", "seed")
    pool = _load_jsonl_samples(run_dir / "pool.jsonl", "pool")

    base = resolve_model(cfg.model.base)
    embedder_model = resolve_model(cfg.model.embedder)
    if embedder_model.embedder_dir is None:
        raise BadInput(f"{cfg.model.embedder} is not an embedding model: set model.embedder to a "
                       "sentence-transformers model (default all-minilm-l6-v2)")
    if base.gguf is None and not cfg.generation.endpoints:
        raise BadInput(f"{cfg.model.base} has no GGUF to serve: give a .gguf file or a catalog chat model")

    phases = [f"iter-{t:02d}/{name}" for t in range(1, cfg.iterations + 1) for name in _phase_names(cfg)]
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
        added += ensure_indexed(index, embedder, _load_jsonl_samples(run_dir / f"iter-{t:02d}" / "generated.jsonl",
                                                                     "generated"))
    added += ensure_indexed(index, embedder, pool)
    index.save()
    events.emit("index_ready", items=len(index), embedded_now=added)

    server = _Serving(cfg, run_dir, events)
    try:
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
                server.ensure(model, lora)
                # Anchors: the domain set as it stood when this iteration began (seeds, then accepted
                # samples of earlier iterations); never the pool, never this iteration's own samples.
                current = _generated_ids(run_dir, first=t)
                anchors = [k for k, it in enumerate(index.items)
                           if it["source"] == "seed" or (it["source"] == "generated" and it["id"] not in current)]
                stats = asyncio.run(_generate(cfg, t, it_dir, index, embedder, server.server, anchors, events))
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
                samples = seeds + [s for i in range(1, t + 1) for s in
                                   _load_jsonl_samples(run_dir / f"iter-{i:02d}" / "generated.jsonl", "generated")]
                previous = run_dir / f"iter-{t - 1:02d}" / "adapter" if cfg.train.start_from == "previous" and t > 1 \
                    else None
                events.emit("train_started", iteration=t, samples=len(samples), backend=cfg.train.backend)
                result = train(base.hf_dir, samples, cfg.train, it_dir / "adapter", previous_adapter=previous,
                               on_step=lambda st, t=t: events.emit("train_step", iteration=t, **st))
                summary = {**result.summary(), "samples": len(samples)}
                events.emit("train_finished", iteration=t, **summary)
                state.finish(phase, sorted((it_dir / "adapter").glob("adapter_*")), summary)

            phase = f"iter-{t:02d}/export"
            if state.done(phase):
                events.emit("phase_skipped", phase=phase)
            else:
                events.emit("export_started", iteration=t, mode=cfg.export.mode)
                exported = export_iteration(
                    base_hf=base.hf_dir, base_gguf=base.gguf, adapter_dir=it_dir / "adapter", out_dir=it_dir,
                    cfg=cfg.export, params=params,
                    on_step=lambda st, t=t: events.emit("export_step", iteration=t, **st))
                info = {**exported.to_json(), "iteration": t, "base": cfg.model.base,
                        "samples": state.stats(f"iter-{t:02d}/train").get("samples"),
                        "config_sha256": hashlib.sha256(to_toml(cfg).encode()).hexdigest()}
                # Paths inside the run are kept relative: a run folder can be moved or copied whole.
                info["serve_model"] = _rel(exported.serve_model, run_dir)
                info["serve_lora"] = [_rel(p, run_dir) for p in exported.serve_lora]
                write_json_atomic(it_dir / "export.json", info)
                events.emit("export_finished", **info)
                written = [p for p in (exported.serve_model, *exported.serve_lora) if p.is_relative_to(run_dir)]
                state.finish(phase, [*written, it_dir / "export.json"], info)
    finally:
        server.stop()
        index.save()
    return _finish(cfg, run_dir, state, events)


def _rel(path: Path, run_dir: Path) -> str:
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _phase_names(cfg: RunConfig) -> list[str]:
    return ["generate", "train", "export"] if cfg.train.enabled else ["generate"]


def _finish(cfg: RunConfig, run_dir: Path, state: RunState, events: Events) -> dict:
    state.set_status("finished")
    events.emit("run_finished", run=cfg.name, folder=str(run_dir))
    return {t: state.stats(f"iter-{t:02d}/generate") for t in range(1, cfg.iterations + 1)}


class _Serving:
    """The managed server of a run: started on demand, restarted when the model changes."""

    def __init__(self, cfg: RunConfig, run_dir: Path, events: Events):
        self.cfg, self.run_dir, self.events = cfg, run_dir, events
        self.server: ManagedServer | None = None

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
        self.events.emit("server_started", url=self.server.base_url, slots=self.server.slots,
                         backend=self.server.backend, pid=self.server.pid, model=str(model))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _generated_ids(run_dir: Path, first: int) -> set[str]:
    """Ids of the samples generated in iteration `first` and later."""
    ids = set()
    for d in run_dir.glob("iter-*"):
        if d.name[5:].isdigit() and int(d.name[5:]) >= first:
            ids |= {r["id"] for r in read_jsonl(d / "generated.jsonl")}
    return ids


async def _generate(cfg, t, it_dir, index, embedder, server, anchors, events) -> dict:
    g = cfg.generation
    if g.endpoints:
        endpoints = [Endpoint(u, slots=g.endpoint_slots, api_key=g.api_key) for u in g.endpoints]
    else:
        endpoints = [Endpoint(server.base_url, slots=server.slots)]
    async with InferenceClient(endpoints) as client:
        phase = GenerationPhase(cfg=cfg, iteration=t, out_dir=it_dir, index=index, embedder=embedder,
                                client=client, anchors=anchors, events=events)
        return await phase.run()
