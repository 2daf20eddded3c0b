"""Keeps a managed server serving through crashes and hangs.

While requests run, a watch task asks the server's health endpoint every
`interval` seconds. A server whose process has exited, or that has not answered
for `hang_after` seconds (stopped, deadlocked, swapping), is killed and started
again on the same port, with exponential backoff between tries. Requests that
were in flight fail with a connection error; the client calls `recover` (which
waits for the restart) and sends them again. More than `max_restarts` restarts
raise `ServerCrashed` naming the server's log, so the caller can stop cleanly
with everything it has kept.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from contextlib import asynccontextmanager

import httpx

from server.errors import ServerCrashed, ServerStartError
from server.process import ManagedServer


class Supervisor:
    def __init__(self, server: ManagedServer, *, max_restarts: int = 3, interval: float = 2.0,
                 hang_after: float = 60.0, backoff: float = 1.0, on_restart=None):
        self.server = server
        self.max_restarts, self.interval, self.hang_after, self.backoff = max_restarts, interval, hang_after, backoff
        self.on_restart = on_restart  # called with (restarts, reason) after each successful restart
        self.restarts = 0
        self.failed: ServerCrashed | None = None
        self._lock: asyncio.Lock | None = None
        self._http: httpx.AsyncClient | None = None
        self._answered_at = time.monotonic()

    @asynccontextmanager
    async def watching(self):
        """Watch the server for the duration of the block (inside the event loop that uses it)."""
        self._lock = asyncio.Lock()
        self._answered_at = time.monotonic()
        async with httpx.AsyncClient(trust_env=False) as http:
            self._http = http
            task = asyncio.create_task(self._watch())
            try:
                yield self
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._http = None

    async def recover(self, error: str = "") -> None:
        """After a failed request: make sure the server is up (restarting it if not) before the retry."""
        if self._lock is None:
            return
        async with self._lock:
            if self.failed:
                raise self.failed
            # A live server gets the whole hang budget to answer: a slow one is not restarted (the watch
            # kills a hung one meanwhile, which this check then sees).
            if self.server.alive() and await self._answers(timeout=self.hang_after):
                return  # a passing fault, or another request's recovery already restarted it
            await self._restart(self._why(error))

    # -- internals -------------------------------------------------------
    def _why(self, fallback: str) -> str:
        """Why the server failed. Called once it has stopped answering: a server that was killed may still be
        dying when a client notices the dropped connection, so give its exit a moment to show."""
        proc = self.server.proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
        if code is not None:
            return f"exited with code {code}"
        return fallback or "stopped answering"

    async def _answers(self, timeout: float) -> bool:
        s = self.server.settings
        path = "/health" if self.server.backend == "native" else "/v1/models"
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        try:
            resp = await self._http.get(self.server.base_url + path, headers=headers, timeout=timeout)
        except httpx.HTTPError:
            return False
        if resp.status_code == 200:
            self._answered_at = time.monotonic()
            return True
        return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.failed:
                return
            if self.server.alive() and await self._answers(timeout=self.hang_after):
                continue
            silent = time.monotonic() - self._answered_at
            if self.server.alive() and silent < self.hang_after:
                continue
            async with self._lock:
                if self.failed or (self.server.alive() and await self._answers(timeout=min(5.0, self.hang_after))):
                    continue
                reason = self._why(f"no answer to health checks for {silent:.0f}s (hung)")
                try:
                    await self._restart(reason)
                except ServerCrashed:
                    return  # recorded in self.failed; in-flight requests raise it from `recover`

    async def _restart(self, reason: str) -> None:
        """Kill and start again, with backoff; give up after `max_restarts`. Holds the lock."""
        if self.server.settings.port is None:  # keep the port: clients hold the URL
            self.server.settings = self.server.settings.model_copy(update={"port": self.server.port})
        while True:
            self.restarts += 1
            if self.restarts > self.max_restarts:
                self.server.stop(timeout=0)
                self.failed = ServerCrashed(
                    f"the {self.server.backend} server failed {self.restarts} times (last: {reason}); "
                    f"see its log {self.server.log_path}")
                raise self.failed
            self.server.stop(timeout=0)  # SIGKILL at once: a hung server won't act on SIGTERM
            await asyncio.sleep(self.backoff * 2 ** (self.restarts - 1))
            try:
                # Started from the event loop's thread on purpose: the parent-death signal is tied to the
                # thread that starts the server (see server.children). Nothing else can run meanwhile anyway.
                self.server.start()
            except ServerStartError as e:
                reason = str(e).splitlines()[0]
                continue
            self._answered_at = time.monotonic()
            if self.on_restart:
                self.on_restart(self.restarts, reason)
            return
