"""Generation and evaluation on `isara worker`s (llama-server routers, on other hosts or this one) instead of
the run's own server, with ISARA's point kept: iteration t generates with iteration t-1's model.

Each time the run needs a model served (the base model, each iteration's export, a baseline's), it puts the
GGUF in the folder the workers serve (`generation.workers_root`: storage both hosts see, as this host sees
it; a hard link where the two share a file system, else a copy) under a name of its own, loads it on every
worker, waits until each serves it, and only then unloads the model before. Every request names the model and
the client refuses an answer from any other (`server.client`), so whichever worker answers, a sample is
written by the model the run meant. A worker that restarts (and so serves nothing) loads it again; one that
hangs is left out until it answers again, and what it held goes to the others.

A name is the model's label in the run (`garden/iter-01`, made one folder name) and a fingerprint of the
file, the run's folder included: two runs, or a file exported again after a crash, never share a name, so
a name always means one file and a file in the shared folder is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path

import httpx

from server.client import Endpoint, InferenceClient
from server.errors import BadInput, ServerUnavailable
from server.router import Router
from server.tempfiles import temp_name

from loop.config import GenerationConfig


def worker_model_name(label: str, gguf: Path, run: Path) -> str:
    """`garden/iter-01` of the file `gguf`, served by the run in the folder `run`, as a router names models:
    one folder name, with 8 hex digits of the file's identity (its absolute path, size and modification time)
    and of the run's folder, so that no other file has it and no other run (two runs on one base model
    included): a run removes what it put in the shared folder, and nothing another run serves."""
    st = gguf.stat()
    identity = f"{run.resolve()}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{label.replace('/', '--')}--{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def place(gguf: Path, target: Path) -> bool:
    """`gguf` at `target`, whole or not at all: a hard link where both are on one file system, else a copy.
    A target already there is this file (its name says so): kept. Returns whether it put it there. A copy cut
    short (a full share, Ctrl-C) leaves nothing behind: the run's temp-file sweep never looks there."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(gguf, tmp)
        except OSError:  # another file system (a network share), or links not allowed there
            shutil.copyfile(gguf, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


class Workers:
    """The run's workers and the model they serve for it now."""

    def __init__(self, cfg: GenerationConfig, events, run: Path):
        self.cfg, self.events, self.run = cfg, events, run  # run: the run's folder (part of every model's name)
        self.root = Path(cfg.workers_root)
        self.current: str | None = None
        self.serving: list[str] = []  # the workers that loaded the current model
        # the models this run put (or, resumed, found) in the shared folder: their names are the run's alone
        self.placed: set[str] = set()

    def router(self, url: str) -> Router:
        return Router(url, self.cfg.api_key)

    def name(self, label: str, gguf: Path) -> str:
        return worker_model_name(label, gguf, self.run)

    def serve(self, gguf: Path, label: str) -> str:
        """Make every worker serve `gguf`, and unload the model they served before. Returns its name."""
        name = self.name(label, gguf)
        if name == self.current:
            self._reload_where_missing()
            return name
        if not self.root.is_dir():
            raise BadInput(f"generation.workers_root {self.root} is not a folder: give the folder the workers serve "
                           "(their --models-root) as this host sees it")
        target = self.root / name / "model.gguf"
        self.placed.add(name)  # put there now, or found there: left by this run before it was killed (its name)
        loading: list[str] = []
        try:
            place(gguf, target)
            for url in self.cfg.workers:
                try:
                    with self.router(url) as router:
                        self._wait_seen(router, name, target)
                        router.load(name)
                    loading.append(url)
                except ServerUnavailable as e:  # a worker that is down is left out, as a dead endpoint would be
                    self.events.emit("worker_unavailable", url=url, reason=str(e))
            loaded = []
            for url in loading:
                try:
                    with self.router(url) as router:
                        router.wait_loaded(name, timeout=self.cfg.workers_wait_s)
                    loaded.append(url)
                except ServerUnavailable as e:  # died, or hung, while loading
                    self.events.emit("worker_unavailable", url=url, reason=str(e))
            if not loaded:
                raise ServerUnavailable(f"no worker could serve {name}: none of {', '.join(self.cfg.workers)} "
                                        "answered or loaded it (see the events)")
        except BaseException:
            self._unload(name, loading)  # nothing half-loaded stays behind a phase that failed
            self._remove(name)
            raise
        previous, self.current, self.serving = self.current, name, loaded
        if previous is not None:
            self._unload(previous, self.cfg.workers)
            self._remove(previous)
        self.events.emit("workers_serving", name=name, workers=loaded, model=str(gguf))
        return name

    def reload(self, url: str) -> bool:
        """Load the current model again on a worker that no longer serves it (it restarted). Returns whether it
        had to (another request's recovery may have done it meanwhile)."""
        with self.router(url) as router:
            if (router.models(rescan=False).get(self.current) or {}).get("value") == "loaded":
                return False
            router.load(self.current)
            router.wait_loaded(self.current, timeout=self.cfg.workers_wait_s)
        return True

    def client(self) -> InferenceClient:
        """Requests over the workers that serve the current model, each naming it; a worker found hung is left
        until it answers again, and before a retry, one that said the model is not loaded loads it again."""
        recovery = _Recovery(self)
        recovery.client = InferenceClient([Endpoint(u, slots=self.cfg.endpoint_slots, api_key=self.cfg.api_key,
                                                    defaults={"model": self.current}) for u in self.serving],
                                          timeout=self.cfg.request_timeout_s, supervisor=recovery)
        return recovery.client

    def release(self) -> None:
        """Unload the current model everywhere (the run is done with it)."""
        if self.current is not None:
            self._unload(self.current, self.cfg.workers)
            self._remove(self.current)
        self.current, self.serving = None, []

    # -- internals -------------------------------------------------------
    def _wait_seen(self, router: Router, name: str, target: Path) -> None:
        """Until the worker lists the new model: shared storage (NFS) may show a new folder only after its
        attribute cache expires."""
        deadline = time.monotonic() + self.cfg.workers_wait_s
        while name not in router.models():
            if time.monotonic() > deadline:
                raise BadInput(f"worker {router.url} does not see {target}, which this run wrote for it: start the "
                               "worker with --models-root set to that folder as its host sees it")
            time.sleep(1.0)

    def _reload_where_missing(self) -> None:
        """Before a phase that uses the model already served: a worker that lost it loads it again, one that
        can't be reached is left out of the phase."""
        for url in list(self.serving):
            try:
                with self.router(url) as router:
                    missing = (router.models(rescan=False).get(self.current) or {}).get("value") != "loaded"
                if missing and self.reload(url):
                    self.events.emit("worker_reloaded", url=url, name=self.current)
            except ServerUnavailable as e:
                self.serving.remove(url)
                self.events.emit("worker_unavailable", url=url, reason=str(e))
        if not self.serving:
            raise ServerUnavailable(f"no worker serves {self.current} any more: none of "
                                    f"{', '.join(self.cfg.workers)} answered")

    def _remove(self, name: str) -> None:
        """A model this run put in the shared folder, once no worker serves it: a copy there (a network share)
        costs a model's size per iteration; a link, a folder entry. The run's own file stays."""
        if name in self.placed:
            shutil.rmtree(self.root / name, ignore_errors=True)
            self.placed.discard(name)

    def _unload(self, name: str, urls: list[str]) -> None:
        for url in urls:
            try:
                with self.router(url) as router:
                    router.unload(name)
            except (ServerUnavailable, BadInput):
                pass  # a worker that is gone (or no longer takes the key) serves nothing of this run's


class _Recovery:
    """The workers' client's `supervisor`: the part a managed server's `Supervisor` plays, for servers the run
    can't restart. While the client is open, a watch asks each worker's health every
    `generation.health_interval_s`; one silent for `generation.hang_timeout_s` (stopped, its host frozen or cut
    off) is lost to the client: the requests it holds are sent again to the others, and it is used again once
    it answers (with every worker lost, requests wait for one, up to `generation.request_timeout_s`). Before a
    retry, a worker that answered "model is not loaded" restarted since the run loaded the model there: load it
    again."""

    def __init__(self, workers: Workers):
        self.workers = workers
        self.client: InferenceClient | None = None  # the client this recovers for (set by Workers.client)
        self._lock: asyncio.Lock | None = None  # made in the client's event loop

    @contextlib.asynccontextmanager
    async def watching(self):
        # trust_env=False: no proxy from the environment, as for the client's own requests
        async with httpx.AsyncClient(trust_env=False) as http:
            tasks = [asyncio.create_task(self._watch(http, e)) for e in self.client.endpoints]
            try:
                yield self
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, http: httpx.AsyncClient, ep: Endpoint) -> None:
        cfg, events = self.workers.cfg, self.workers.events
        checked_at = time.monotonic()
        while True:
            await asyncio.sleep(cfg.health_interval_s)
            try:  # a router answers /health itself (no key needed), whatever its models' servers are doing
                resp = await http.get(ep.url + "/health", timeout=cfg.hang_timeout_s)
                why = None if resp.status_code == 200 else f"health answered {resp.status_code}"
            except httpx.TimeoutException:
                why = "hung"
            except httpx.HTTPError as e:
                why = f"down: {type(e).__name__}"
            if why is None:
                checked_at = time.monotonic()
                if ep.lost:
                    await self.client.restore(ep.url)
                    events.emit("worker_back", url=ep.url)
                continue
            # any answer is a sign of life: a worker busy with long requests may be slow to answer its health
            silent = time.monotonic() - max(checked_at, ep.answered_at)
            if not ep.lost and silent >= cfg.hang_timeout_s:
                reason = f"no answer to health checks for {silent:.0f}s ({why})"
                await self.client.lose(ep.url, reason)
                events.emit("worker_unavailable", url=ep.url, reason=reason)

    async def recover(self, error: str = "") -> None:
        # the client's error text starts with the endpoint's URL and the request's path ("http://h:8090/v1/...")
        url = next((u for u in self.workers.serving if error.startswith(u + "/")), None)
        if url is not None and "not loaded" in error:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:  # the requests that failed together: one reload
                try:
                    reloaded = await asyncio.to_thread(self.workers.reload, url)
                except ServerUnavailable:
                    return  # down again: the retry goes elsewhere
            if reloaded:  # emitted on the event loop's thread, not the reload's: events are not thread-safe
                self.workers.events.emit("worker_reloaded", url=url, name=self.workers.current)
