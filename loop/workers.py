"""Generation and evaluation on `isara worker`s (llama-server routers, on other hosts or this one) instead of
the run's own server, with ISARA's point kept: iteration t generates with iteration t-1's model.

Each time the run needs a model served (the base model, each iteration's export, a baseline's), it puts the
GGUF in the folder the workers serve (`generation.workers_root`: storage both hosts see, as this host sees
it; a hard link where the two share a file system, else a copy), loads it on every worker under one name,
waits until each serves it, and only then unloads the model before. Every request names the model, and the
client refuses an answer from any other (`server.client`), so whichever worker answers, a sample is written by
the model the run meant.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from server.client import Endpoint, InferenceClient
from server.errors import BadInput, ServerUnavailable
from server.router import Router
from server.tempfiles import temp_name

from loop.config import GenerationConfig

LOAD_TIMEOUT_S = 600.0  # a worker reads the GGUF from shared storage: a large model on a slow share


def worker_model_name(label: str) -> str:
    """The run's label of a model (`garden/iter-01`) as a router names models: one folder name
    (`garden--iter-01`). Samples record it as the name their worker answered with."""
    return label.replace("/", "--")


def place(gguf: Path, target: Path) -> bool:
    """`gguf` at `target`, whole or not at all: a hard link where both are on one file system, else a copy.
    A target already made from the same file (the same inode, or a copy as large and newer) is kept. Returns
    whether the target is new (a worker that loaded the old file must load it again)."""
    if target.exists():
        if os.path.samefile(gguf, target):
            return False
        src, dst = gguf.stat(), target.stat()
        if src.st_size == dst.st_size and dst.st_mtime >= src.st_mtime:
            return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    tmp.unlink(missing_ok=True)
    try:
        os.link(gguf, tmp)
    except OSError:  # another file system (a network share), or links not allowed there
        shutil.copyfile(gguf, tmp)
    os.replace(tmp, target)
    return True


class Workers:
    """The run's workers and the model they serve for it now."""

    def __init__(self, cfg: GenerationConfig, events):
        self.cfg, self.events = cfg, events
        self.root = Path(cfg.workers_root)
        self.current: str | None = None
        self.serving: list[str] = []  # the workers that loaded the current model

    def serve(self, gguf: Path, label: str) -> None:
        """Make every worker serve `gguf` as `worker_model_name(label)`; unload the model they served before."""
        name = worker_model_name(label)
        if name == self.current:
            return
        if not self.root.is_dir():
            raise BadInput(f"generation.workers_root {self.root} is not a folder: give the folder the workers serve "
                           "(their --models-root) as this host sees it")
        target = self.root / name / "model.gguf"
        if place(gguf, target):
            self._unload(name)  # a worker still serving an older file of this name (a resumed run) reads it anew
        loaded, down = [], []
        for url in self.cfg.workers:
            with Router(url, self.cfg.api_key) as router:
                try:
                    if name not in router.models():
                        raise BadInput(f"worker {url} does not see {target}, which this run wrote for it: start the "
                                       "worker with --models-root set to that folder as its host sees it")
                    router.load(name)
                except ServerUnavailable as e:  # a worker that is down is left out, as a dead endpoint would be
                    down.append(url)
                    self.events.emit("worker_unavailable", url=url, reason=str(e))
                    continue
                loaded.append(url)
        for url in loaded:
            with Router(url, self.cfg.api_key) as router:
                router.wait_loaded(name, timeout=LOAD_TIMEOUT_S)
        if not loaded:
            raise ServerUnavailable(f"no worker could load {name}: {', '.join(down)} can't be reached")
        previous, self.current, self.serving = self.current, name, loaded
        if previous is not None:
            self._unload(previous)
        self.events.emit("workers_serving", name=name, workers=loaded, model=str(gguf))

    def client(self) -> InferenceClient:
        """Requests over the workers that serve the current model, each naming it."""
        return InferenceClient([Endpoint(u, slots=self.cfg.endpoint_slots, api_key=self.cfg.api_key,
                                         defaults={"model": self.current}) for u in self.serving],
                               timeout=self.cfg.request_timeout_s)

    def release(self) -> None:
        """Unload the current model everywhere (the run is done with it)."""
        if self.current is not None:
            self._unload(self.current)
        self.current, self.serving = None, []

    def _unload(self, name: str) -> None:
        for url in self.cfg.workers:
            try:
                with Router(url, self.cfg.api_key) as router:
                    router.unload(name)
            except (ServerUnavailable, BadInput):
                pass  # a worker that is gone (or no longer takes the key) serves nothing of this run's
