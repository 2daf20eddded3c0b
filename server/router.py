"""llama-server's router mode, from the client's side: which models a router offers, load one, wait until it
serves, unload one.

A router (`ServerSettings(models_dir=...)`, `isara worker`) serves no model of its own: every GGUF in its
models folder is a model by name (`NAME.gguf` or `NAME/model.gguf`), loaded on request into a child
llama-server, and a request names the model it wants ("model": NAME) and is answered with that name. Loading
is asynchronous: `POST /models/load` returns at once and the model's status goes `loading` -> `loaded`, or
back to `unloaded` with `failed` when the child could not start (an unreadable or broken file).

Only these four endpoints are used; what a model is and why it is loaded is the caller's business.
"""

from __future__ import annotations

import time

import httpx

from server.errors import BadInput, ServerUnavailable


class Router:
    """One router at `url` (with its API key, if any). Every call raises ServerUnavailable when the router
    can't be reached, and BadInput naming the router and the model when the router refuses."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 10.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def models(self, rescan: bool = True) -> dict[str, dict]:
        """Each model the router offers, by name, with its status (`value`: unloaded, loading, loaded; `failed`
        and `exit_code` after a failed load). `rescan`: look at the models folder again first (a file added
        since the router started, or since the last look)."""
        data = self._call("GET", "/models", params={"reload": 1} if rescan else None)
        return {m["id"]: m.get("status") or {} for m in data.get("data", [])}

    def load(self, name: str) -> None:
        """Start loading `name` (returns before it serves: see `wait_loaded`). Loading a loaded model is a no-op."""
        status = self.models().get(name)
        if status is None:
            raise BadInput(f"router {self.url} has no model {name!r} in its models folder: the file the run wrote "
                           "is not where this worker looks (check that its --models-root is the folder the run "
                           "writes to, as the worker's host sees it)")
        if status.get("value") in ("loaded", "loading"):
            return
        self._call("POST", "/models/load", json={"model": name})

    def wait_loaded(self, name: str, timeout: float = 300.0, interval: float = 0.2) -> None:
        """Until `name` serves; a failed load is BadInput naming the router and the model."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.models(rescan=False).get(name) or {}
            if status.get("value") == "loaded":
                return
            if status.get("failed") and status.get("value") != "loading":
                raise BadInput(f"router {self.url} could not load {name!r} (its server exited with code "
                               f"{status.get('exit_code')}): a file the worker can't read, or a broken GGUF; "
                               "the worker's log says which")
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"router {self.url} did not load {name!r} within {timeout:.0f}s "
                                        f"(status {status.get('value')!r})")
            time.sleep(interval)

    def unload(self, name: str, timeout: float = 60.0) -> None:
        """Stop serving `name` and wait until its server is gone (the router says "loaded" until then, and a load
        of the same name meanwhile would be a no-op); a model that is not loaded is left as it is."""
        if (self.models(rescan=False).get(name) or {}).get("value") not in ("loaded", "loading"):
            return
        self._call("POST", "/models/unload", json={"model": name})
        deadline = time.monotonic() + timeout
        while (self.models(rescan=False).get(name) or {}).get("value") in ("loaded", "loading"):
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"router {self.url} did not unload {name!r} within {timeout:.0f}s")
            time.sleep(0.1)

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServerUnavailable(f"router {self.url} can't be reached ({type(e).__name__} {e})".strip()) from None
        if resp.status_code == 401:
            raise BadInput(f"router {self.url} refused the API key: give the key the worker was started with")
        if resp.status_code >= 400:
            raise BadInput(f"router {self.url}{path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()
