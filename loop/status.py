"""Where runs stand, read from their files alone (no process is asked)."""

from __future__ import annotations

from pathlib import Path

from loop.data import read_jsonl
from loop.layout import EVAL, EXPORT, GENERATE, STEPS, TRAIN, RunLayout, iteration_name, phase_name
from loop.state import RunState
from loop.training.checkpoint import checkpoint_step


def run_summary(run_dir: Path) -> dict:
    layout, state = RunLayout(run_dir), RunState(run_dir)
    rows = []
    for t in sorted(set(state.iterations()) | set(layout.iterations_on_disk())):
        gen = state.stats(phase_name(t, GENERATE))
        accepted = gen.get("accepted", len(read_jsonl(layout.generated(t), repair=False)))
        export = state.stats(phase_name(t, EXPORT))
        done = [step for step in STEPS if state.recorded(phase_name(t, step))]
        ev = state.stats(phase_name(t, EVAL))
        rows.append({"iteration": iteration_name(t), "accepted": accepted, "target": gen.get("target"),
                     "acceptance_rate": gen.get("acceptance_rate"), "phases_done": done,
                     "last_loss": state.stats(phase_name(t, TRAIN)).get("last_loss"),
                     # a training stopped mid-epoch goes on from here when the run is resumed
                     "checkpoint": None if TRAIN in done else checkpoint_step(layout.checkpoint(t)),
                     "model": export.get("serve_model"),
                     "verified": (export.get("verification") or {}).get("passed"),
                     "harmful_rate": ev.get("harmful_rate"), "over_refusal": ev.get("over_refusal"),
                     "holdout": ev.get("holdout")})
    status = state.status
    if status == "running" and state.live_pid() is None:
        status = "interrupted"  # the process that wrote "running" is gone: resume with `isara run FOLDER`
    return {"name": run_dir.name, "folder": str(run_dir), "status": status,
            "stopped": state.data.get("stopped") if status == "stopped" else None, "iterations": rows}


def status_text(summary: dict) -> str:
    """finished / running / interrupted, or why and where a run stopped (what the run recorded)."""
    stop = summary.get("stopped")
    if not stop:
        return summary["status"]
    return f"stopped: {stop['reason']} in {stop['phase']}" + (f" ({stop['message']})" if stop.get("message") else "")
