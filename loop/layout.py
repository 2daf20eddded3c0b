"""The run folder: every path and name in `runs/<name>/`, in one place.

    runs/<name>/
      config.toml        the resolved configuration (all defaults filled in)
      base.json          the base model as the run prepared it (phase base-model/prepare)
      seeds.jsonl        the validated seeds, with ids (less the held-out ones)
      validation.jsonl   the seeds held out to choose the run's model (data.validation > 0)
      holdout.jsonl      the seeds held out to score every model against (eval.holdout > 0)
      pool.jsonl         the validated external pool, when there is one
      domain.json        where a built-in domain's data came from
      state.json         finished phases, with checksums of what they wrote (read through RunState)
      events.jsonl       every event, one a line
      index.usearch      the retrieval index (+ index.items.jsonl)
      server.log         the managed llama-server's log
      iter-NN/generated.jsonl, rejected.jsonl, stats.json
      iter-NN/adapter/, model.gguf, export.json      (training on)
      iter-NN/validation.jsonl                       (held-out seeds: the model's answers, judged)
      iter-NN/answers.jsonl, eval.json               (evaluation on)
      baselines/{base,icl-knn,sft-seeds}/ the same files, for the baselines
      evals/iter-NN/     `isara eval` of an iteration
      report.md, report.png

An iteration's folder is `iter-` and its number, zero-padded to two digits
(`iter-07`, `iter-100`); iterations are compared by number, never by name, so
iteration 100 comes after 11. A phase is named `<folder>/<step>`
(`iter-03/train`, `baselines/sft-seeds/eval`): that name is its key in
state.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The steps of an iteration, in order; baselines use the same names.
GENERATE, TRAIN, EXPORT, VALIDATE, EVAL = "generate", "train", "export", "validate", "eval"
STEPS = (GENERATE, TRAIN, EXPORT, VALIDATE, EVAL)
BASELINES = ("base", "icl-knn", "sft-seeds")
# The first phase of every run: the base model made ready to serve and to train (base.json).
PREPARE_BASE = "base-model/prepare"

_ITERATION = re.compile(r"^iter-(\d{2,})$")


def iteration_name(t: int) -> str:
    return f"iter-{t:02d}"


def parse_iteration(name: str) -> int | None:
    """`iter-07` -> 7, `iter-100` -> 100; anything else (`iter-x`, `iter-7`) -> None."""
    m = _ITERATION.match(name)
    return int(m.group(1)) if m else None


def phase_name(t: int, step: str) -> str:
    return f"{iteration_name(t)}/{step}"


def matched_name(t: int) -> str:
    """The SFT-on-seeds baseline trained as long as ISARA's iteration t (eval.sft_matched)."""
    return f"sft-matched-{t}"


def baseline_phase(baseline: str, step: str) -> str:
    return f"baselines/{baseline}/{step}"


def phase_iteration(phase: str) -> tuple[int | None, str]:
    """`iter-03/train` -> (3, "train"); a baseline's or the seeds' phase -> (None, its step)."""
    folder, _, step = phase.rpartition("/")
    return parse_iteration(folder), step


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    # --- files of the run ---
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def seeds(self) -> Path:
        return self.root / "seeds.jsonl"

    @property
    def validation(self) -> Path:
        return self.root / "validation.jsonl"

    @property
    def holdout(self) -> Path:
        return self.root / "holdout.jsonl"

    @property
    def pool(self) -> Path:
        return self.root / "pool.jsonl"

    @property
    def domain(self) -> Path:
        return self.root / "domain.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def base_model(self) -> Path:
        """The base model as the run prepared it (its chat template written in, its GGUF or checkpoint made)."""
        return self.root / "base.json"

    @property
    def versions(self) -> Path:
        """isara, Python, llama.cpp and library versions, one entry each time the run starts (a resume is another)."""
        return self.root / "versions.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def server_log(self) -> Path:
        return self.root / "server.log"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    # --- iterations ---
    def iteration(self, t: int) -> Path:
        return self.root / iteration_name(t)

    def generated(self, t: int) -> Path:
        return self.iteration(t) / "generated.jsonl"

    def rejected(self, t: int) -> Path:
        return self.iteration(t) / "rejected.jsonl"

    def stats(self, t: int) -> Path:
        return self.iteration(t) / "stats.json"

    def adapter(self, t: int) -> Path:
        return self.iteration(t) / "adapter"

    def checkpoint(self, t: int) -> Path:
        """The training's mid-epoch checkpoint (loop/training/checkpoint.py), while it has not finished."""
        return self.iteration(t) / "checkpoint"

    def train_log(self, t: int) -> Path:
        return self.iteration(t) / "train_log.csv"

    def export_info(self, t: int) -> Path:
        return self.iteration(t) / "export.json"

    def validation_answers(self, t: int) -> Path:
        return self.iteration(t) / "validation.jsonl"

    def iterations_on_disk(self) -> list[int]:
        """Numbers of the iteration folders that exist, in numeric order."""
        found = (parse_iteration(d.name) for d in self.root.glob("iter-*") if d.is_dir())
        return sorted(t for t in found if t is not None)

    # --- baselines and evals ---
    def baseline(self, name: str) -> Path:
        return self.root / "baselines" / name

    def eval_dir(self, t: int) -> Path:
        """Where `isara eval` puts its answers for iteration t (the run's own evals are in the iteration folder)."""
        return self.root / "evals" / iteration_name(t)

    def resolve(self, rel: str) -> Path:
        """A path a phase recorded relative to the run (so a run folder can move whole), made absolute."""
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def served(self, export: dict) -> tuple[Path, list[Path]]:
        """The GGUF (and LoRA GGUFs) an export recorded (export.json, or its phase's stats), as a server loads them."""
        return self.resolve(export["serve_model"]), [self.resolve(p) for p in export.get("serve_lora", [])]


def find_runs(runs_dir: Path) -> list[Path]:
    """The run folders in `runs_dir` (those with a state.json), by name."""
    return sorted(d for d in runs_dir.glob("*") if RunLayout(d).state.is_file())
