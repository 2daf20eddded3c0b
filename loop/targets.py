"""MODEL|RUN: the commands that use a model (eval, chat, serve, export) take either.

A run is named by its folder or by its name under the runs folder; it stands
for the model of its latest exported iteration, or of the iteration that scored
best on its held-out seeds when it held some out (data.validation), or of
`iteration`, when given.
Anything else is a model: catalog name, .gguf file or HF folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import BadInput

from loop.evaluation.validation import run_model
from loop.layout import RunLayout, find_runs, iteration_name
from loop.models.store import load_catalog, resolve_model
from loop.state import RunState


@dataclass
class Target:
    label: str
    gguf: Path
    lora: list[Path] = field(default_factory=list)
    run_dir: Path | None = None
    iteration: int | None = None
    export: dict = field(default_factory=dict)  # the iteration's export.json (runs only)
    note: str | None = None  # why this iteration, when the run chose it on its held-out seeds


def run_folder(spec: str, runs_dir: Path) -> Path | None:
    p = Path(spec).expanduser()
    for candidate in (p, runs_dir / spec):
        if RunLayout(candidate).state.is_file():
            return candidate.resolve()
    return None


def resolve_target(spec: str, runs_dir: Path = Path("runs"), iteration: int | None = None) -> Target:
    run_dir = run_folder(spec, runs_dir)
    if run_dir is None:
        if iteration is not None:
            raise BadInput(f"--iteration is for runs, and {spec!r} is not a run folder: drop --iteration or "
                           f"name a run in {runs_dir}")
        try:
            m = resolve_model(spec)
        except BadInput as e:
            runs = ", ".join(d.name for d in find_runs(runs_dir)) or "none"
            if str(e).startswith("unknown model"):
                raise BadInput(f"{spec!r} is neither a run nor a model: runs in {runs_dir}: {runs}; models: "
                               f"{', '.join(sorted(load_catalog()))}; or give a .gguf file") from None
            raise
        if m.gguf is None and m.kind == "chat":  # an HF folder: its GGUF is made once, by `models add`
            raise BadInput(f"{spec} is an HF folder with no GGUF to serve yet: run `isara models add {spec}` once, "
                           "then give the GGUF it names")
        if m.gguf is None:
            raise BadInput(f"{spec} is an embedding model: give a chat model (a catalog name, a .gguf file) or a run")
        return Target(label=m.name, gguf=m.gguf)
    done = RunState(run_dir).exported_iterations()
    if not done:
        raise BadInput(f"run {run_dir.name} has no exported model yet: let `isara run {run_dir}` finish an "
                       "iteration with training on")
    state = RunState(run_dir)
    scores = {t: s for t, s in state.validation_scores().items() if t in done}
    best = run_model(scores, done)
    t = iteration if iteration is not None else best
    note = None
    if iteration is None and scores:
        note = (f"{run_dir.name}: iteration {best}, the best on the held-out seeds (score {scores[best]}; "
                f"{', '.join(f'{i}: {scores[i]}' for i in sorted(scores))}); --iteration T for another")
    if t not in done:
        raise BadInput(f"run {run_dir.name} has no exported iteration {t}: choose one of "
                       f"{', '.join(map(str, done))}")
    layout = RunLayout(run_dir)
    info = json.loads(layout.export_info(t).read_text())
    gguf, lora = layout.served(info)
    return Target(label=f"{run_dir.name}/{iteration_name(t)}", gguf=gguf, lora=lora, run_dir=run_dir, iteration=t,
                  export=info, note=note)
