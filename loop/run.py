"""A run: its configuration, its folder, and its phases, run in order and resumed.

`plan` is the algorithm at a glance: the base model prepared (loop/prepare.py),
the baselines once (base model, ICL-kNN, SFT on the seeds), then for every iteration t: generate samples with the model
of iteration t-1, train the LoRA, export and verify the GGUF, score it on the
held-out seeds (when some are held out), evaluate it.
`execute` runs the plan: a phase that `state.json` records as finished (with
its files unchanged) is skipped, every other one runs; an unfinished
generation continues from the samples already on disk. Running the same run
again therefore resumes it. The folder's layout is in `loop/layout.py`, the
phases in `loop/phases.py`.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from server.errors import BadInput

from loop import phases as ph
from loop.config import RunConfig, load_config, to_toml
from loop.data import load_samples, write_jsonl_atomic
from loop.domains import load_domain
from loop.evaluation.evaluate import EvalItem, eval_items, eval_sets
from loop.evaluation.holdout import holdout_items, holdout_split
from loop.evaluation.report import write_report
from loop.evaluation.validation import held_out_split
from loop.events import Events
from loop.files import disk_problem, sweep_stale_temps, write_json_atomic, write_text_atomic
from loop.layout import EVAL, EXPORT, GENERATE, PREPARE_BASE, TRAIN, VALIDATE, RunLayout, baseline_phase, \
    matched_name, phase_name
from loop.models.store import resolve_model
from loop.prepare import prepare_base
from loop.state import RunState

load_run_samples = ph.load_run_samples  # public: bench and tests read a run's samples with it


@dataclass(frozen=True)
class Phase:
    name: str  # its key in state.json, e.g. "iter-02/train"
    run: Callable[[ph.RunContext], ph.Written]
    report: bool = False  # rewrite report.md once it has finished (evaluations)
    setup: Callable[[ph.RunContext], None] | None = None  # before the clock starts: the server it needs


def plan(cfg: RunConfig, items: list[EvalItem]) -> list[Phase]:
    """Every phase of the run, in the order they run."""
    phases = [Phase(PREPARE_BASE, prepare_base)]
    if items and cfg.eval.baselines:
        phases += [Phase(baseline_phase("base", EVAL), ph.evaluate_base, report=True, setup=ph.serve_base),
                   Phase(baseline_phase("icl-knn", EVAL), ph.evaluate_icl_knn, report=True, setup=ph.serve_base)]
        if cfg.train.enabled:
            sft = partial(ph.serve_export, export_phase=baseline_phase("sft-seeds", EXPORT))
            phases += [Phase(baseline_phase("sft-seeds", TRAIN), ph.train_sft_seeds, setup=ph.stop_serving),
                       Phase(baseline_phase("sft-seeds", EXPORT), ph.export_sft_seeds, setup=ph.stop_serving),
                       Phase(baseline_phase("sft-seeds", EVAL), ph.evaluate_sft_seeds, report=True, setup=sft)]
            if cfg.eval.sft_matched:  # the seeds alone, as long as each iteration trains (once per run)
                for t in range(1, cfg.iterations + 1):
                    name = matched_name(t)
                    serve = partial(ph.serve_export, export_phase=baseline_phase(name, EXPORT))
                    phases += [Phase(baseline_phase(name, TRAIN), partial(ph.train_sft_matched, t=t),
                                     setup=ph.stop_serving),
                               Phase(baseline_phase(name, EXPORT), partial(ph.export_sft_matched, t=t),
                                     setup=ph.stop_serving),
                               Phase(baseline_phase(name, EVAL), partial(ph.evaluate_sft_matched, t=t), report=True,
                                     setup=serve)]
    for t in range(1, cfg.iterations + 1):
        # Generation's clock includes starting its server (as it always has): that is part of an iteration.
        phases.append(Phase(phase_name(t, GENERATE), partial(ph.generate_samples, t=t)))
        if not cfg.train.enabled:
            continue
        phases += [Phase(phase_name(t, TRAIN), partial(ph.train_iteration, t=t), setup=ph.stop_serving),
                   Phase(phase_name(t, EXPORT), partial(_export_iteration, t=t), setup=ph.stop_serving)]
        serve = partial(ph.serve_export, export_phase=phase_name(t, EXPORT))
        if cfg.data.validation and not cfg.generation.endpoints:  # endpoints serve their own model, not t's
            phases.append(Phase(phase_name(t, VALIDATE), partial(ph.validate_iteration, t=t), report=True,
                                setup=serve))
        if items:
            phases.append(Phase(phase_name(t, EVAL), partial(ph.evaluate_iteration, t=t), report=True, setup=serve))
    return phases


def _export_iteration(ctx: ph.RunContext, t: int) -> ph.Written:
    return ph.export_gguf(ctx, ctx.layout.iteration(t), label=t, train_phase=phase_name(t, TRAIN))


def execute(cfg: RunConfig, run_dir: Path, *, output: str = "plain", sink=None) -> dict:
    """Run (or resume) every phase; returns the per-iteration generation stats."""
    layout = RunLayout(run_dir)
    _not_run_elsewhere(run_dir)
    _writable(run_dir)
    sweep_stale_temps(run_dir)  # what a killed run was writing when it died: never whole, never read
    state = RunState(run_dir)
    events = Events(layout.events, mode=output, sink=sink)
    _write_config(cfg, layout)
    record_versions(layout.versions)
    state.set_status("running", pid=os.getpid(), stopped=None)
    events.emit("run_started", run=cfg.name, folder=str(run_dir), iterations=cfg.iterations)
    where = {"phase": "setup"}
    try:
        return _run_phases(cfg, run_dir, layout, state, events, where)
    except BaseException as e:
        # Said in the run's own files, for `isara status` and whoever opens the folder later. A SIGKILL or
        # a power cut leaves no word: status calls a "running" run whose process is gone interrupted.
        try:
            state.set_status("stopped", stopped={"reason": stop_reason(e), "phase": where["phase"],
                                                 "message": (str(e).splitlines() or [type(e).__name__])[0][:300],
                                                 "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except OSError:
            pass  # a full disk may not take even this: the error that stopped the run is what the user must see
        raise


def _run_phases(cfg: RunConfig, run_dir: Path, layout: RunLayout, state: RunState, events: Events,
                where: dict) -> dict:
    domain = load_domain(cfg.domain, log=lambda m: events.emit("message", text=m)) if cfg.domain else None
    if not state.done("seeds"):
        state.begin("seeds")
        state.finish("seeds", *_validate_data(cfg, layout, domain))
        if multi := state.stats("seeds").get("multi_turn"):
            events.emit("message", text=f"{multi} seeds are conversations (more than one exchange, or a system "
                                        "message): every turn is trained on; retrieval embeds their user turns, "
                                        "the demos show their last question and answer")
    embedder = resolve_model(cfg.model.embedder)
    if embedder.embedder_dir is None:
        raise BadInput(f"{cfg.model.embedder} is not an embedding model: set model.embedder to a "
                       "sentence-transformers model (default all-minilm-l6-v2)")
    items = _eval_items(cfg, domain, layout)
    phases = plan(cfg, items)
    if all(state.done(p.name) for p in phases):  # nothing to do: don't load the embedder or start a server
        for p in phases:
            events.emit("phase_skipped", phase=p.name)
        return _finish(cfg, layout, state, events)
    ctx = ph.RunContext(cfg=cfg, layout=layout, state=state, events=events, items=items,
                        seeds=ph.load_run_samples(layout.seeds, "seed"), embedder_dir=embedder.embedder_dir)
    try:
        for phase in phases:
            if state.done(phase.name):
                events.emit("phase_skipped", phase=phase.name)
                continue
            where["phase"] = phase.name
            if phase.setup is not None:
                phase.setup(ctx)  # outside the phase's clock: a server start or stop is not the phase's work
            state.begin(phase.name)
            state.finish(phase.name, *phase.run(ctx))
            if phase.report:
                write_report(run_dir, cfg.name or run_dir.name)
    finally:
        ctx.close()
    return _finish(cfg, layout, state, events)


def stop_reason(e: BaseException) -> str:
    """Why a run stopped, in the words `isara status` shows."""
    from server.errors import ServerCrashed, ServerStartError, ServerUnavailable

    from loop.models.verify import ExportVerificationFailed

    if isinstance(e, KeyboardInterrupt):
        return "interrupted by the user"
    if disk_problem(e) is not None:
        return "disk full"
    if isinstance(e, ExportVerificationFailed):
        return "export verification failed"
    if isinstance(e, BadInput):
        return "bad input"
    if isinstance(e, (ServerCrashed, ServerStartError, ServerUnavailable)):
        return "server failed"
    return "crashed"


def record_versions(path: Path) -> None:
    """What made the run, one entry each time the run starts (a resumed run may run on other versions): isara, Python,
    llama.cpp and the libraries that compute."""
    import importlib.metadata
    import platform

    from loop import __version__
    from server.toolchain import LLAMA_CPP_PYTHON_VERSION

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "isara": __version__,
             "python": platform.python_version(), "llama.cpp (llama-cpp-python sdist)": LLAMA_CPP_PYTHON_VERSION,
             **{dist: version(dist) for dist in ("torch", "transformers", "peft", "usearch", "unsloth", "trl")}}
    try:
        sessions = json.loads(path.read_text(encoding="utf-8"))["sessions"]
    except (OSError, ValueError, KeyError, TypeError):
        sessions = []  # none yet (or a damaged file: this start's entry starts it again)
    write_json_atomic(path, {"sessions": [*sessions, entry]})


def _validate_data(cfg: RunConfig, layout: RunLayout, domain) -> ph.Written:
    """Seeds and pool, validated once: from then on the run's own copies are the truth."""
    seeds = load_samples(cfg.data.seeds or domain.seeds, max_chars=cfg.data.max_chars)
    total = len(seeds)
    if cfg.data.validation > total // 2:
        raise BadInput(f"data.validation = {cfg.data.validation} would hold out more than half of the "
                       f"{total} seeds: set it to at most {total // 2} (or 0)")
    # Seeded by eval.seed, not generation.seed: runs that differ only in their generation seed hold out the
    # same seeds, so they share their baselines and their scores compare.
    seeds, held_out = held_out_split(seeds, cfg.data.validation, cfg.kinds.count, cfg.kinds.opening_words,
                                     cfg.eval.seed)
    # Then the test set (eval.holdout, a share of all the seeds) from the rest: the two never share a seed.
    # Only where every model is evaluated and there are models to evaluate (a data-only run keeps them all).
    share = cfg.eval.holdout if _evaluated(cfg) and cfg.train.enabled else 0.0
    seeds, holdout = holdout_split(seeds, share, cfg.eval.seed, total=total)
    write_jsonl_atomic(layout.seeds, [s.to_json() for s in seeds])
    files = [layout.seeds]
    if held_out:
        write_jsonl_atomic(layout.validation, [s.to_json() for s in held_out])
        files.append(layout.validation)
    if holdout:
        write_jsonl_atomic(layout.holdout, [s.to_json() for s in holdout])
        files.append(layout.holdout)
    if domain is not None:  # where the built-in data came from: package, version, file, licence
        write_json_atomic(layout.domain, domain.sources)
        files.append(layout.domain)
    if cfg.data.pool is not None:
        pool = load_samples(cfg.data.pool, source="pool", max_chars=cfg.data.max_chars, min_count=1)
        # A held-out seed must not come back as a pool demo: a pool record with its question is left out.
        withheld = {s.prompt for s in held_out + holdout}
        kept = [s for s in pool if s.prompt not in withheld]
        pool_dropped = len(pool) - len(kept)
        write_jsonl_atomic(layout.pool, [s.to_json() for s in kept])
        files.append(layout.pool)
    return files, {"seeds": len(seeds), "held_out": len(held_out), "holdout": len(holdout),
                   **({"pool_dropped_as_held_out": pool_dropped} if cfg.data.pool is not None else {}),
                   "multi_turn": sum(bool(s.context) for s in seeds),
                   "system_messages": sum(any(m["role"] == "system" for m in s.context) for s in seeds)}


def _evaluated(cfg: RunConfig) -> bool:
    # External endpoints serve their own model, not this run's: evaluating them would mislead.
    return cfg.eval.enabled and not cfg.generation.endpoints


def _eval_items(cfg: RunConfig, domain, layout: RunLayout) -> list[EvalItem]:
    """The prompts every model of the run answers: the configured sets, else the domain's; then the
    held-out seeds' questions (scored against their own answers)."""
    if not _evaluated(cfg):
        return []
    sets = eval_sets(cfg.eval.refuse_prompts, cfg.eval.answer_prompts, domain, cfg.eval.pair_prompts)
    held = ph.load_run_samples(layout.holdout, "seed") if layout.holdout.is_file() else []
    return (eval_items(sets, cfg.eval.n, cfg.eval.seed) if sets else []) + holdout_items(held)


def _finish(cfg: RunConfig, layout: RunLayout, state: RunState, events: Events) -> dict:
    report = write_report(layout.root, cfg.name or layout.name)
    state.set_status("finished")
    events.emit("run_finished", run=cfg.name, folder=str(layout.root), report=str(report))
    return {t: state.stats(phase_name(t, GENERATE)) for t in range(1, cfg.iterations + 1)}


# --- the run's folder and configuration ----------------------------------------------

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
    if config_path is not None and Path(config_path).is_dir() and RunLayout(Path(config_path)).config.is_file():
        run_dir = Path(config_path).resolve()
        cfg = load_config(RunLayout(run_dir).config, overrides, base_dir=run_dir)
        cfg.name, cfg.runs_dir = run_dir.name, run_dir.parent
        return cfg, run_dir
    extra = [f"name={_toml_str(name)}"] if name else []
    cfg = load_config(config_path, [*overrides, *extra])
    run_dir = run_dir_for(cfg)
    if RunLayout(run_dir).config.is_file():
        stored = load_config(RunLayout(run_dir).config, [*overrides, *extra], base_dir=run_dir)
        stored.runs_dir = cfg.runs_dir
        return stored, run_dir
    return cfg, run_dir


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _not_run_elsewhere(run_dir: Path) -> None:
    """Two processes on one run folder would append to the same files and overwrite each other's state, so a
    second `isara run` is refused while the first lives, before anything is written."""
    if not RunLayout(run_dir).state.is_file():
        return
    pid = RunState(run_dir).live_pid()
    if pid is not None and pid != os.getpid():
        raise BadInput(f"{run_dir} is being run by process {pid}: wait for it to finish, or stop it "
                       f"(Ctrl-C where it runs, or kill -INT {pid}), then resume with: isara run {run_dir}")


def _writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"can't write to {run_dir} ({e.strerror}): choose a writable runs_dir "
                       "(--set runs_dir=PATH)") from None


def _write_config(cfg: RunConfig, layout: RunLayout) -> None:
    text = to_toml(cfg)
    tomllib.loads(text)  # never write a config the next resume can't read
    write_text_atomic(layout.config, text)
