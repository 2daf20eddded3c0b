"""Async client for OpenAI-compatible inference endpoints (llama-server, vLLM, ...).

One client spreads requests over one or many endpoints and keeps as many in
flight on each as it has slots, so llama-server's continuous batching stays
full. Connection errors, timeouts, 5xx answers and a router's "model is not
loaded" are retried with exponential backoff, on another endpoint where there is
one; before each retry a managed server's `Supervisor` may restart a dead or hung
server. An endpoint a watch finds hung (`lose`) gets no new request and gives up
the ones it holds, which are sent again elsewhere, until it answers again
(`restore`). A request that names a model is answered by that model or not at all.
Every result carries its token counts and timings (the dashboard and the
benchmarks read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import httpx

from server.errors import ServerUnavailable

class RequestRejected(Exception):
    """The endpoint answered 4xx: the request itself is wrong (retrying won't help)."""


class ContextExceeded(RequestRejected):
    """The prompt does not fit a slot's context: the caller can send a shorter one (fewer demos)."""

    def __init__(self, message: str, prompt_tokens: int | None = None, n_ctx: int | None = None):
        super().__init__(message)
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


class EndpointLost(Exception):
    """The request was given up on because its endpoint was found hung while it waited (see `lose`)."""


_RETRYABLE = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors


_GENERATING = ("/v1/chat/completions", "/v1/completions", "/completion")  # where Endpoint.defaults apply


@dataclass
class Endpoint:
    url: str
    slots: int = 1
    api_key: str | None = None
    defaults: dict = field(default_factory=dict)  # request fields sent unless a request sets them
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    down_until: float = 0.0
    answered_at: float = 0.0  # time.monotonic() of its last answer, whatever it said (a watch's sign of life)
    # done, with the reason, once a watch found it hung: the requests in flight here are given up; a restored
    # endpoint gets a new one
    gave_up: asyncio.Future | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.slots < 1:
            raise ValueError(f"endpoint {self.url}: slots must be at least 1")

    @property
    def lost(self) -> str | None:
        """Why no request goes here now (a watch found it hung); None: in use."""
        return self.gave_up.result() if self.gave_up is not None and self.gave_up.done() else None


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    endpoint: str
    prompt_ms: float | None = None  # server-side prompt processing time, when reported
    predicted_ms: float | None = None  # server-side generation time, when reported
    cached_tokens: int = 0  # prompt tokens the server took from its prompt cache instead of computing them
    attempts: int = 1
    model: str | None = None  # the name the server answered with (llama-server: its --alias)
    raw: dict = field(default_factory=dict, repr=False)


class InferenceClient:
    """Use inside `async with`; `complete`, `chat`, `embed`, `post` are safe to gather."""

    def __init__(self, endpoints: Iterable[Endpoint | str], *, timeout: float = 300.0, connect_timeout: float = 5.0,
                 retries: int = 3, backoff: float = 0.5, api_key: str | None = None, supervisor=None):
        self.endpoints = [e if isinstance(e, Endpoint) else Endpoint(e, api_key=api_key) for e in endpoints]
        if not self.endpoints:
            raise ValueError("InferenceClient needs at least one endpoint")
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.retries = retries
        self.backoff = backoff
        # A managed server's Supervisor: watched while the client is open, asked to recover before a retry.
        self.supervisor = supervisor
        self._watching = None
        self._http: httpx.AsyncClient | None = None
        self._free: asyncio.Condition | None = None

    @classmethod
    def for_servers(cls, servers, **kw) -> "InferenceClient":
        """A client over running `ManagedServer`s, each with its slot count and key."""
        return cls([Endpoint(s.base_url, slots=s.slots, api_key=s.settings.api_key, defaults=s.request_defaults)
                    for s in servers], **kw)

    @property
    def capacity(self) -> int:
        return sum(e.slots for e in self.endpoints)

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self.endpoints)

    async def __aenter__(self) -> "InferenceClient":
        limits = httpx.Limits(max_connections=self.capacity + 8, max_keepalive_connections=self.capacity + 8)
        # trust_env=False: never route through a proxy from the environment; only the configured endpoints.
        self._http = httpx.AsyncClient(timeout=self.timeout, limits=limits, trust_env=False)
        self._free = asyncio.Condition()
        for e in self.endpoints:  # made in this event loop (a future belongs to the loop that awaits it)
            e.gave_up = asyncio.get_running_loop().create_future()
        if self.supervisor is not None:
            self._watching = self.supervisor.watching()
            await self._watching.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        if self._watching is not None:
            await self._watching.__aexit__(None, None, None)
            self._watching = None
        await self._http.aclose()
        self._http = None

    # -- requests --------------------------------------------------------
    async def complete(self, prompt: str | list[int], *, max_tokens: int = 256, stop: list[str] | None = None,
                       temperature: float = 0.8, top_p: float = 0.95, seed: int | None = None,
                       **extra: Any) -> Completion:
        """Raw text completion (`/v1/completions`): the prompt goes to the model as is."""
        payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                   **({"stop": stop} if stop else {}), **({"seed": seed} if seed is not None else {}), **extra}
        return await self._generate("/v1/completions", payload, lambda c: c.get("text", ""))

    async def chat(self, messages: list[dict], *, max_tokens: int = 256, stop: list[str] | None = None,
                   temperature: float = 0.8, top_p: float = 0.95, seed: int | None = None,
                   **extra: Any) -> Completion:
        """Chat completion: the server applies the model's own chat template."""
        payload = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                   **({"stop": stop} if stop else {}), **({"seed": seed} if seed is not None else {}), **extra}
        return await self._generate("/v1/chat/completions", payload,
                                    lambda c: (c.get("message") or {}).get("content") or "")

    async def stream_chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.7,
                          top_p: float = 0.95, seed: int | None = None, **extra: Any):
        """Chat completion streamed as server-sent events: yields text pieces as they are generated.

        Not retried: a stream that broke half-way can't be replayed without showing text twice."""
        if self._http is None:
            raise RuntimeError("use InferenceClient inside `async with`")
        payload = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                   "stream": True, **({"seed": seed} if seed is not None else {}), **extra}
        ep = await self._acquire(None)
        try:
            headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
            async with self._http.stream("POST", ep.url + "/v1/chat/completions", json={**ep.defaults, **payload},
                                         headers=headers) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    text = f"{ep.url}/v1/chat/completions answered {resp.status_code}: {_error_text(resp)}"
                    raise _rejection(resp, text) if resp.status_code < 500 else ServerUnavailable(text)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    choice = (json.loads(data).get("choices") or [{}])[0]
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except _RETRYABLE as e:
            raise ServerUnavailable(f"{ep.url}: the stream broke ({type(e).__name__} {e})") from None
        finally:
            await self._release(ep)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        data, _, _ = await self._request("/v1/embeddings", {"input": texts})
        rows = sorted(data["data"], key=lambda d: d["index"])
        return [r["embedding"] for r in rows]

    async def post(self, path: str, payload: dict) -> dict:
        """Any JSON endpoint (e.g. llama-server's native `/completion` or `/tokenize`)."""
        data, _, _ = await self._request(path, payload)
        return data

    async def map(self, fn, items: Iterable) -> list:
        """`await fn(item)` for every item concurrently; the slots bound what is in flight."""
        return await asyncio.gather(*(fn(x) for x in items))

    # -- endpoints a watch found hung -------------------------------------
    async def lose(self, url: str, reason: str) -> None:
        """Stop using the endpoint at `url`: the requests it holds are given up and sent again elsewhere (a hung
        server would hold them until the read timeout, minutes), and none goes there until `restore`. With
        every endpoint lost, requests wait for one to be restored, up to the request timeout, then fail naming
        each one's reason."""
        ep = self._endpoint(url)
        if not ep.gave_up.done():
            ep.gave_up.set_result(reason)
        async with self._free:
            self._free.notify_all()  # requests waiting for a slot: none may open here now

    async def restore(self, url: str) -> None:
        """Use the endpoint at `url` again (it answers again)."""
        ep = self._endpoint(url)
        if ep.gave_up.done():  # the requests given up before were given up with the old one
            ep.gave_up = asyncio.get_running_loop().create_future()
        async with self._free:
            self._free.notify_all()

    def _endpoint(self, url: str) -> Endpoint:
        url = url.rstrip("/")
        return next(e for e in self.endpoints if e.url == url)

    # -- internals -------------------------------------------------------
    async def _generate(self, path: str, payload: dict, text_of) -> Completion:
        t0 = time.perf_counter()
        data, endpoint, attempts = await self._request(path, payload)
        choice = (data.get("choices") or [{}])[0]
        usage = data.get("usage") or {}
        timings = data.get("timings") or {}
        return Completion(
            text=text_of(choice), finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or timings.get("prompt_n") or 0),
            completion_tokens=int(usage.get("completion_tokens") or timings.get("predicted_n") or 0),
            latency_s=time.perf_counter() - t0, endpoint=endpoint.url,
            prompt_ms=timings.get("prompt_ms"), predicted_ms=timings.get("predicted_ms"),
            cached_tokens=_cached_tokens(usage, timings), attempts=attempts, model=data.get("model"), raw=data,
        )

    async def _acquire(self, avoid: Endpoint | None) -> Endpoint:
        all_lost_since = None
        async with self._free:
            while True:
                now = time.monotonic()
                if all(e.lost for e in self.endpoints):  # wait for one to answer again (`restore`), for a while
                    all_lost_since = all_lost_since or now
                    left = all_lost_since + self.timeout.read - now
                    if left <= 0:
                        raise ServerUnavailable(f"no endpoint answered for {self.timeout.read:.0f}s: " + "; ".join(
                            f"{e.url} {e.lost}" for e in self.endpoints))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._free.wait(), left)
                    continue
                all_lost_since = None  # one came back: a later loss of them all waits afresh
                open_ = [e for e in self.endpoints if e.in_flight < e.slots and not e.lost]
                healthy = [e for e in open_ if e.down_until <= now and e is not avoid] or \
                          [e for e in open_ if e.down_until <= now] or open_
                if healthy:
                    ep = min(healthy, key=lambda e: (e.in_flight / e.slots, e.served))
                    ep.in_flight += 1
                    return ep
                await self._free.wait()

    async def _release(self, ep: Endpoint) -> None:
        async with self._free:
            ep.in_flight -= 1
            self._free.notify()

    async def _request(self, path: str, payload: dict) -> tuple[dict, Endpoint, int]:
        if self._http is None:
            raise RuntimeError("use InferenceClient inside `async with`")
        last_error = ""
        avoid = None
        attempt = sent = 0
        while attempt <= self.retries:
            attempt, sent = attempt + 1, sent + 1
            ep = await self._acquire(avoid)
            try:
                headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
                body = {**ep.defaults, **payload} if path in _GENERATING else payload
                resp = await self._post(ep, path, body, headers)
                ep.answered_at = time.monotonic()
                if resp.status_code < 400:
                    data = resp.json()
                    asked, answered = body.get("model"), data.get("model")
                    if path in _GENERATING and asked and answered != asked:
                        # a router serves many models: a text from any other than the one named is not wanted
                        raise RequestRejected(f"{ep.url}{path} answered a request for model {asked!r} as "
                                              f"{answered!r}: it serves another model under that name")
                    ep.served += 1
                    return data, ep, sent
                if resp.status_code < 500 and not _not_loaded_yet(resp):
                    raise _rejection(resp, f"{ep.url}{path} answered {resp.status_code}: {_error_text(resp)}")
                last_error = f"{ep.url}{path} answered {resp.status_code}: {_error_text(resp)}"
            except EndpointLost as e:
                # the endpoint was found hung, not this request or its answer at fault: sent again at once,
                # elsewhere, and not counted against the retries (a loss takes hang_timeout_s of silence each time)
                last_error = f"{ep.url}{path}: {e}"
                attempt -= 1
                avoid = ep
                continue
            except _RETRYABLE as e:
                last_error = f"{ep.url}{path}: {type(e).__name__} {e}".strip()
            finally:
                await self._release(ep)
            ep.failures += 1
            if attempt > self.retries:
                break
            if self.supervisor is not None:
                await self.supervisor.recover(last_error)  # restarts a crashed server; raises to give up
            delay = self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            ep.down_until = time.monotonic() + delay
            avoid = ep
            await asyncio.sleep(delay)
        raise ServerUnavailable(f"no endpoint answered after {self.retries + 1} tries; last error: {last_error}")

    async def _post(self, ep: Endpoint, path: str, body: dict, headers: dict) -> httpx.Response:
        """The POST, given up (EndpointLost, retried elsewhere) if its endpoint is lost before the answer."""
        gave_up = ep.gave_up  # this request's: a restored endpoint gets a new one
        post = asyncio.ensure_future(self._http.post(ep.url + path, json=body, headers=headers))
        try:
            await asyncio.wait((post, gave_up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not post.done():
                post.cancel()
                await asyncio.gather(post, return_exceptions=True)  # its connection closed before the slot frees
            elif not post.cancelled():
                # Failed (a killed server's ReadError) as this request was cancelled: read here, or asyncio prints
                # "Task exception was never retrieved" and its traceback under the run's one-line error.
                post.exception()
        if not post.cancelled():
            return post.result()
        raise EndpointLost(f"given up: {gave_up.result()}")


def _not_loaded_yet(resp: httpx.Response) -> bool:
    """A router that does not serve the requested model now (restarted, or still loading it) answers 400 "model
    is not loaded": retried, elsewhere first, like a server that is down; never answered by another model."""
    return resp.status_code == 400 and "not loaded" in _error_text(resp)


def _cached_tokens(usage: dict, timings: dict) -> int:
    """llama-server reports the reused prompt tokens as `timings.cache_n`; OpenAI's schema (vLLM, llama-server
    too) as `usage.prompt_tokens_details.cached_tokens`."""
    details = usage.get("prompt_tokens_details") or {}
    return int(timings.get("cache_n") or details.get("cached_tokens") or 0)


def _rejection(resp: httpx.Response, text: str) -> RequestRejected:
    """A 4xx answer as an exception; a prompt over the slot's context as ContextExceeded. llama-server says
    so by its error type (with the two sizes), llama-cpp-python's server by the OpenAI code."""
    try:
        err = resp.json().get("error")
    except ValueError:
        err = None
    if isinstance(err, dict) and (err.get("type") == "exceed_context_size_error"
                                  or err.get("code") == "context_length_exceeded"):
        return ContextExceeded(text, err.get("n_prompt_tokens"), err.get("n_ctx"))
    return RequestRejected(text)


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return resp.text[:300]
