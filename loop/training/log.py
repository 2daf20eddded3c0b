"""What training reports besides `events.jsonl`, in the phase's folder (`train.report_to`):

- `csv`: `train_log.csv`, one row per optimizer step (step, steps, loss, lr, tokens, seconds,
  tokens/s, the step of a checkpoint saved there), rewritten whole (atomically) at every step: a
  spreadsheet or pandas reads it as it grows, and a resumed training keeps the rows up to the
  checkpoint it went on from.
- `tensorboard`: event files in `tensorboard/` (`tensorboard --logdir runs/NAME`): `train/loss`,
  `train/lr`, `train/tokens_per_s`, the scalars trl and transformers' Trainer log under the same names.
  Needs the `tensorboard` package; nothing is sent anywhere.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from server.errors import BadInput

from loop.files import write_text_atomic

COLUMNS = ("step", "steps", "loss", "lr", "tokens", "seconds", "tokens_per_s", "checkpoint")
CSV_NAME = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"


def check_report_to(report_to: list[str]) -> None:
    """Before any work: a report the machine can't write is one line, not a failure after generation."""
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise BadInput("train.report_to includes tensorboard but the tensorboard package is not installed: "
                       "pip install tensorboard, or set train.report_to = [\"csv\"]")


class TrainLog:
    def __init__(self, folder: Path, report_to: list[str]):
        self.folder, self.rows = folder, []
        if report_to:
            folder.mkdir(parents=True, exist_ok=True)  # a baseline's folder may not exist before its training
        self.csv = folder / CSV_NAME if "csv" in report_to else None
        if self.csv is not None and self.csv.is_file():  # a training that goes on from a checkpoint
            self.rows = list(csv.DictReader(io.StringIO(self.csv.read_text(encoding="utf-8"))))
        self.tensorboard = None
        if "tensorboard" in report_to:
            check_report_to(report_to)
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder / TENSORBOARD_DIR))

    def step(self, st: dict) -> None:
        seconds = st.get("seconds") or 0
        row = {"step": st["step"], "steps": st["steps"], "loss": round(st["loss"], 5), "lr": st.get("lr"),
               "tokens": st.get("tokens"), "seconds": seconds,
               "tokens_per_s": round(st["tokens"] / seconds, 1) if st.get("tokens") and seconds else None,
               "checkpoint": st.get("checkpoint", "")}
        if self.csv is not None:
            # Rows from before a resume reach only up to the checkpoint it went on from: drop the rest.
            self.rows = [r for r in self.rows if int(r["step"]) < row["step"]] + [row]
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            write_text_atomic(self.csv, out.getvalue())
        if self.tensorboard is not None:
            for name in ("loss", "lr", "tokens_per_s"):
                if row[name] is not None:
                    self.tensorboard.add_scalar(f"train/{name}", row[name], row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
