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
import os
import tomllib
from pathlib import Path

from server.client import Endpoint, InferenceClient
from server.errors import BadInput
from server.process import ManagedServer, ServerSettings

from loop.config import RunConfig, load_config, to_toml
from loop.data import Sample, load_samples, read_jsonl, write_jsonl_atomic
from loop.generate import GenerationPhase
from loop.models import resolve_model
from loop.retrieval import DomainIndex, Embedder, ensure_indexed
from loop.state import Events, RunState


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_jsonl_samples(path: Path, source: str) -> list[Sample]:
    return [Sample(id=r["id"], prompt=r["prompt"], response=r["response"], source=source,
                   meta=r.get("meta", {})) for r in read_jsonl(path)]


def execute(cfg: RunConfig, run_dir: Path, *, output: str = "plain") -> dict:
    """Run (or resume) every phase; returns the per-iteration stats."""
    _writable(run_dir)
    state = RunState(run_dir)
    events = Events(run_dir / "events.jsonl", mode=output)
    _write_config(cfg, run_dir)
    state.set_status("running")
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

    phases = [f"iter-{t:02d}/generate" for t in range(1, cfg.iterations + 1)]
    if all(state.done(p) for p in phases):  # nothing to do: don't load the embedder or start a server
        for p in phases:
            events.emit("phase_skipped", phase=p)
        state.set_status("finished")
        events.emit("run_finished", run=cfg.name, folder=str(run_dir))
        return {t: state.stats(p) for t, p in enumerate(phases, start=1)}

    embedder = Embedder(embedder_model.embedder_dir)
    index = DomainIndex.open(run_dir, embedder.dim)
    added = ensure_indexed(index, embedder, seeds)
    for t in range(1, cfg.iterations + 1):
        added += ensure_indexed(index, embedder, _load_jsonl_samples(run_dir / f"iter-{t:02d}" / "generated.jsonl",
                                                                     "generated"))
    added += ensure_indexed(index, embedder, pool)
    index.save()
    events.emit("index_ready", items=len(index), embedded_now=added)

    all_stats = {}
    server = None
    try:
        for t in range(1, cfg.iterations + 1):
            phase = f"iter-{t:02d}/generate"
            it_dir = run_dir / f"iter-{t:02d}"
            if state.done(phase):
                all_stats[t] = state.stats(phase)
                events.emit("phase_skipped", phase=phase)
                continue
            if server is None and not cfg.generation.endpoints:
                server = _start_server(cfg, base.gguf, run_dir)
                events.emit("server_started", url=server.base_url, slots=server.slots, backend=server.backend,
                            pid=server.pid)
            # Anchors: the domain set as it stood when this iteration began (seeds, then accepted samples
            # of earlier iterations); never the pool, never this iteration's own samples (on resume).
            current = _generated_ids(run_dir, first=t)
            anchors = [k for k, it in enumerate(index.items)
                       if it["source"] == "seed" or (it["source"] == "generated" and it["id"] not in current)]
            stats = asyncio.run(_generate(cfg, t, it_dir, index, embedder, server, anchors, events))
            # Data scaling ratio (the paper's): accepted generated samples so far over seeds.
            so_far = stats["accepted"] + sum(all_stats[i].get("accepted", 0) for i in range(1, t))
            stats["scaling_ratio"] = round(so_far / len(seeds), 3)
            _write_json_atomic(it_dir / "stats.json", stats)
            state.finish(phase, [it_dir / "generated.jsonl", it_dir / "rejected.jsonl", it_dir / "stats.json"],
                         stats)
            all_stats[t] = stats
            # Training and export plug in here (train.enabled); a data-only run stops after generation.
    finally:
        if server is not None:
            server.stop()
        index.save()
    state.set_status("finished")
    events.emit("run_finished", run=cfg.name, folder=str(run_dir))
    return all_stats


def _generated_ids(run_dir: Path, first: int) -> set[str]:
    """Ids of the samples generated in iteration `first` and later."""
    ids = set()
    for d in run_dir.glob("iter-*"):
        if d.name[5:].isdigit() and int(d.name[5:]) >= first:
            ids |= {r["id"] for r in read_jsonl(d / "generated.jsonl")}
    return ids


def _write_json_atomic(path: Path, data: dict) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _start_server(cfg: RunConfig, gguf: Path, run_dir: Path) -> ManagedServer:
    g = cfg.generation
    settings = ServerSettings(model=gguf, slots=g.slots, ctx_per_slot=g.ctx_per_slot, threads=g.threads,
                              log_path=run_dir / "server.log")
    return ManagedServer(settings).start()


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
