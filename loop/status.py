"""Where runs stand, read from their files alone (no process is asked)."""

from __future__ import annotations

import json
from pathlib import Path

from loop.data import read_jsonl


def run_summary(run_dir: Path) -> dict:
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
    phases = state.get("phases", {})
    iterations = sorted({p.split("/")[0] for p in phases if p.startswith("iter-")} |
                        {d.name for d in run_dir.glob("iter-*") if d.is_dir()})
    rows = []
    for it in iterations:
        gen = phases.get(f"{it}/generate", {}).get("stats", {})
        accepted = gen.get("accepted", len(read_jsonl(run_dir / it / "generated.jsonl", repair=False)))
        export = phases.get(f"{it}/export", {}).get("stats", {})
        done = [name for name in ("generate", "train", "export", "eval") if f"{it}/{name}" in phases]
        ev = phases.get(f"{it}/eval", {}).get("stats", {})
        rows.append({"iteration": it, "accepted": accepted, "target": gen.get("target"),
                     "acceptance_rate": gen.get("acceptance_rate"), "phases_done": done,
                     "last_loss": phases.get(f"{it}/train", {}).get("stats", {}).get("last_loss"),
                     "model": export.get("serve_model"),
                     "verified": (export.get("verification") or {}).get("passed"),
                     "harmful_rate": ev.get("harmful_rate"), "over_refusal": ev.get("over_refusal")})
    status = state.get("status", "new")
    if status == "running" and not _alive(state.get("pid")):
        status = "interrupted"  # the process that wrote "running" is gone: resume with `isara run FOLDER`
    return {"name": run_dir.name, "folder": str(run_dir), "status": status, "iterations": rows}


def _alive(pid) -> bool:
    import psutil

    return bool(pid) and psutil.pid_exists(int(pid))


def find_runs(runs_dir: Path) -> list[Path]:
    return sorted(d for d in runs_dir.glob("*") if (d / "state.json").is_file())
