"""The one way temporary files are named, in `server/` and `loop/` alike.

Every atomic write goes to `.NAME.tmp-PID` beside its target, then
`os.replace`s it into place. The stale-temp sweep of a resumed run
(`loop/files.py`) recognises leftovers by this pattern and the writer's pid, so
every writer must agree on it. Standard library only: `make setup` runs the
toolchain before any dependency is installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# `.NAME.tmp-PID` (and the run's `.write-test-PID` probe): group 1 is the writer's pid.
TEMP_PATTERN = re.compile(r"^\.(?:.+\.tmp|write-test)-(\d+)$")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
