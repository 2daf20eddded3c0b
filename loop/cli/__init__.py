"""The `isara` command line: one module per group of commands, all on the group of `loop.cli.common`.

Exit codes: 0 ok, 1 the job failed (a server that would not start, a tool that
failed), 2 bad input (the message names the problem and the fix). Tracebacks
only with `--debug`.
"""

from __future__ import annotations

import os

from loop.cli import bench, evaluate, export, models, run, serve  # noqa: F401  (each adds its commands)
from loop.cli.common import cli

# Offline by default: no library reaches for a model hub or sends telemetry; isara talks only to the
# endpoints it is configured with (set HF_HUB_OFFLINE=0 yourself to let a library download).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def main() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    cli(prog_name="isara")
