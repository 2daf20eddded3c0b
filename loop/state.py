"""Run state (`state.json`); the run's events are in loop/events.py.

state.json records every finished phase with the sha256 and size of each file
it wrote. A resumed run skips finished phases after checking those files are
still what the phase wrote; a phase that is not recorded runs (again), picking
up what it left on disk. Written atomically: it is always whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from server.errors import BadInput

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
