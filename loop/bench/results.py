"""bench.json: the machine, the generation rows (with their ratios to the other engines and to the
machine's bound) and every other part's results, from one run."""

from __future__ import annotations

import time
from pathlib import Path

from loop.bench.machine import machine
from loop.files import write_json_atomic


def write_results(rows: list[dict], out_dir: Path, command: str, extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
            "generation": rows, **(extra or {})}
    path = out_dir / "bench.json"
    write_json_atomic(path, data)
    return path
