"""Run state (`state.json`) and events (`events.jsonl`).

state.json records every finished phase with the sha256 and size of each file
it wrote. A resumed run skips finished phases after checking those files are
still what the phase wrote; a phase that is not recorded runs (again), picking
up what it left on disk. Written atomically: it is always whole.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from server.errors import BadInput

from loop.data import append_jsonl, cut_torn_tail
from loop.files import write_json_atomic
from loop.layout import EXPORT, VALIDATE, RunLayout, phase_iteration


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "size": path.stat().st_size}


class RunState:
    """The only reader and writer of state.json."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = RunLayout(run_dir).state
        self.data = {"version": 1, "status": "new", "phases": {}}
        self._began: dict[str, float] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise BadInput(f"{self.path} is not valid JSON: restore it, or delete the run folder "
                               "to start over") from None

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def done(self, phase: str) -> bool:
        """Finished, with its files unchanged since; a changed file is a one-line error."""
        rec = self.data["phases"].get(phase)
        if not rec:
            return False
        for rel, digest in rec.get("files", {}).items():
            p = self.run_dir / rel
            if not p.exists() or file_digest(p) != digest:
                raise BadInput(f"{p} changed after phase {phase!r} finished: restore it, or delete "
                               f"{p.parent} to redo that phase")
        return True

    def recorded(self, phase: str) -> bool:
        """Finished, as far as state.json says (no file is checked: for readers such as status and report)."""
        return phase in self.data["phases"]

    @property
    def status(self) -> str:
        return self.data.get("status", "new")

    @property
    def pid(self) -> int | None:
        return self.data.get("pid")

    def live_pid(self) -> int | None:
        """The pid of the `isara run` that holds this folder while it lives; None once the run finished or its
        process is gone. A pid that now belongs to another program is not the run (pids are reused)."""
        if self.status != "running" or not self.pid:
            return None
        import psutil

        try:
            argv = psutil.Process(int(self.pid)).cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        return int(self.pid) if "run" in argv and any(a.endswith("isara") or a == "loop.cli" for a in argv) else None

    def iterations(self) -> list[int]:
        """Iterations with at least one finished phase, in numeric order."""
        return sorted({t for t, _ in map(phase_iteration, self.data["phases"]) if t is not None})

    def exported_iterations(self) -> list[int]:
        return sorted(t for t, step in map(phase_iteration, self.data["phases"]) if t is not None and step == EXPORT)

    def validation_scores(self) -> dict[int, float]:
        """Iteration -> its score on the held-out seeds (runs with data.validation > 0)."""
        return {t: self.stats(p)["score"] for p in self.data["phases"]
                for t, step in [phase_iteration(p)] if t is not None and step == VALIDATE}

    def stats(self, phase: str) -> dict:
        return self.data["phases"].get(phase, {}).get("stats", {})

    def begin(self, phase: str) -> None:
        """Start the clock of a phase (its `seconds` cover the session that finished it)."""
        self._began[phase] = time.monotonic()

    def seconds(self, phase: str) -> float | None:
        return self.data["phases"].get(phase, {}).get("seconds")

    def finish(self, phase: str, files: list[Path], stats: dict | None = None) -> None:
        began = self._began.pop(phase, None)
        self.data["phases"][phase] = {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.monotonic() - began, 1) if began is not None else None,
            "files": {str(p.relative_to(self.run_dir)): file_digest(p) for p in files if p.exists()},
            "stats": stats or {},
        }
        self.save()

    def set_status(self, status: str, **extra) -> None:
        self.data["status"] = status
        self.data.update(extra)
        self.save()


class Events:
    """Every event goes to events.jsonl; `printer` shows it (plain lines, JSON, or nothing)."""

    def __init__(self, path: Path, mode: str = "plain", stream=None, sink=None):
        self.path = path
        self.mode = mode  # plain | json | quiet | live (events go to `sink`, the dashboard)
        self.stream = stream or sys.stdout
        self.sink = sink
        self.started = time.monotonic()
        cut_torn_tail(path)  # a run killed mid-append resumes here

    def emit(self, kind: str, **fields) -> None:
        event = {"t": round(time.time(), 3), "event": kind, **fields}
        append_jsonl(self.path, event)
        if self.mode == "json":
            print(json.dumps(event, ensure_ascii=False), file=self.stream, flush=True)
        elif self.mode == "live" and self.sink is not None:
            self.sink(kind, fields)
        elif self.mode == "plain":
            line = plain_line(kind, fields)
            if line:
                print(f"[{time.monotonic() - self.started:7.1f}s] {line}", file=self.stream, flush=True)


def plain_line(kind: str, f: dict) -> str | None:
    it = f.get("iteration")
    who = "baseline sft-seeds" if it == 0 else f"iter {it}"  # iteration 0: the SFT-on-seeds baseline
    if kind == "accepted":
        return f"{who}: accepted {f['accepted']}/{f['target']} ({f['id']})"
    if kind == "rejected":
        return f"{who}: rejected attempt {f['attempt']}: {f['reason']}"
    if kind == "generation_started":
        extra = f", resuming with {f['resumed_accepted']} accepted" if f.get("resumed_accepted") else ""
        return f"{who}: generating {f['target']} samples{extra}"
    if kind == "generation_finished":
        return (f"{who}: {f['accepted']} accepted of {f['attempts']} attempts "
                f"(rate {f['acceptance_rate']:.0%}; rejected {f['rejected_by_reason'] or 'none'}); "
                f"{f['accepted_per_minute']} accepted/min")
    if kind == "train_started":
        return f"{who}: training on {f['samples']} samples ({f['backend']})"
    if kind == "train_step":
        return f"{who}: train step {f['step']}/{f['steps']} loss {f['loss']:.4f} ({f['tokens']} tokens)"
    if kind == "train_finished":
        how = ", compiled" if f.get("compiled") else ""
        if f.get("compile_error"):
            how = f", eager: the compile failed ({f['compile_error']})"
        return (f"{who}: trained {f['steps']} steps, loss {f['first_loss']} -> {f['last_loss']}, "
                f"{f['tokens_per_s']} tokens/s{how}, peak RSS {f['peak_rss_mb']} MB")
    if kind == "export_step":
        return f"{who}: export {f['step']} {f['seconds']}s"
    if kind == "export_finished":
        v = f.get("verification") or {}
        check = "not verified" if not v else ("verified" if v.get("passed") else "verification FAILED (recorded)")
        if v:  # greedy agreement per verification prompt, of the F16 intermediate too where one was checked
            parts = [f"{q} {', '.join(f'{a:.0%}' for a in r['agreement'])}"
                     for q, r in (("F16", v.get("f16")), (f["quant"], v)) if r]
            check += f" (greedy agreement: {'; '.join(parts)})"
        return f"{who}: exported {f['serve_model']} ({f['mode']}, {f['quant']}), {check}"
    if kind == "eval_started":
        return f"eval {f['label']}: {f['prompts']} prompts, greedy"
    if kind == "eval_finished":
        h = f.get("holdout")
        parts = ([] if f.get("harmful_rate") is None and f.get("over_refusal") is None else
                 [f"harmful {f['harmful_rate']}, over-refusal {f['over_refusal']}, degenerate {f['degenerate_rate']}"])
        if f.get("pairs_over_refusal") is not None:
            parts.append(f"pairs: harmful {f['pairs_harmful_rate']}, over-refusal {f['pairs_over_refusal']}")
        if h:
            parts.append(f"held-out seeds: ROUGE-L {h['rouge_l']}, cosine {h['cosine']}, loss {h.get('loss')}")
        return f"eval {f['label']}: {'; '.join(parts) or 'no prompts'} ({f['seconds']}s)"
    if kind == "validation_finished":
        return (f"{who}: held-out seeds {f['right']}/{f['n']} answered in their kind, score {f['score']}"
                f" (per kind {f['per_kind']})")
    if kind == "workers_serving":
        return f"workers serving {f['name']}: {', '.join(f['workers'])}"
    if kind == "worker_unavailable":
        return f"worker {f['url']} left out: {f['reason']}"
    if kind == "worker_back":
        return f"worker {f['url']} answers again: back in use"
    if kind == "worker_reloaded":
        return f"worker {f['url']} lost {f['name']} (restarted?): loaded it again"
    if kind == "prepare_started":
        return (f"base model {f['model']}: preparing it to serve" + (" and to train" if f.get("training") else "")
                + " (made once in the model store, then found there)")
    if kind == "prepare_finished":
        trains = f", trains {f['hf_dir']} ({f['params']:,} parameters)" if f.get("hf_dir") and f.get("params") else ""
        return f"base model {f['name']}: serves {f['gguf'] or 'on the endpoints'}{trains}"
    if kind == "message":
        return f["text"]
    if kind in ("run_started", "run_finished", "phase_skipped", "server_started", "server_restarted",
                "index_ready"):
        return f"{kind.replace('_', ' ')}: " + ", ".join(f"{k}={v}" for k, v in f.items())
    return None
