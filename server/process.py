"""The managed inference server: start, wait for health, restart, stop.

Two backends behind one interface, both OpenAI-compatible:
- `native`: llama.cpp's own `llama-server` (continuous batching over `-np` slots);
- `python`: `python -m llama_cpp.server`, a fallback when the native binary is
  not built (it serializes requests: one slot in effect).

A server is never left behind: it runs in its own process group (stopped with
SIGTERM, then SIGKILL), is stopped at interpreter exit, and gets a parent-death
signal (`server.children`) so that even a SIGKILLed Python process takes it down.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from server.children import set_parent_death_signal
from server.errors import BadInput, PortInUse, ServerStartError, ToolchainMissing
from server.gguf import read_gguf
from server.toolchain import find_toolchain

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerSettings(BaseModel):
    """How one server runs: what it serves, where, with how many slots. Checked when made (a backend other than
    auto, native or python, a port or a slot count out of range is refused there); `isara serve` and
    `isara worker` take their flags from these fields: type, bounds, default and help."""
    model_config = ConfigDict(validate_assignment=True)

    model: Path | None = Field(description="The GGUF to serve; None with models_dir: a router.")
    lora: list[Path] = Field(default_factory=list, description="LoRA GGUFs applied on the model.")
    host: str = Field("127.0.0.1", description="Address to bind; anything but loopback needs --api-key.")
    port: int | None = Field(None, ge=1, le=65535, description="Port to listen on.")  # None: a free one
    slots: int = Field(4, ge=1, le=256, description="Parallel sequences (continuous batching).")
    ctx_per_slot: int = Field(2048, ge=64, description="Context length per slot.")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: llama.cpp's).")
    api_key: str | None = Field(None, description="Required off loopback.")
    backend: Literal["auto", "native", "python"] = Field(
        "auto", description="native: llama-server; python: python -m llama_cpp.server; auto: native where built.")
    alias: str | None = Field(None, description="The model's name in the API (/v1/models, \"model\" in requests); "
                                                "default: the servers' own, the file path.")
    embeddings: bool = False
    log_path: Path | None = None
    startup_timeout: float = 120.0
    extra_args: list[str] = Field(default_factory=list)
    # llama-server's router mode: no model of its own; every GGUF in this folder (`NAME.gguf`, or
    # `NAME/model.gguf`) is a model a client loads by NAME (`POST /models/load`) and names in its requests.
    # Each loaded model runs in a child llama-server with this server's slots, context and threads.
    models_dir: Path | None = None
    models_max: int = Field(2, ge=1, description="Models loaded at once: the one served and the next while it loads.")

    @property
    def serves(self) -> str:
        """What the server serves, for messages: its GGUF, or the folder a router serves."""
        return str(self.model) if self.models_dir is None else f"the models in {self.models_dir}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # Like the server itself: connections in TIME_WAIT (a restart) don't block the port, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise PortInUse(f"port {port} on {host} is already in use: choose another with --port, "
                                "or leave it out to take a free one") from None
            raise BadInput(f"can't bind {host}:{port} ({e.strerror}): check the --host address") from None


def resolve_backend(requested: str) -> str:
    if requested == "python":
        return "python"
    if find_toolchain() is not None:
        return "native"
    if requested == "native":
        raise ToolchainMissing("llama-server is not built: run `make setup` (or use the python backend)")
    return "python"


class ManagedServer:
    """One inference server process. Use as a context manager or call start/stop."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.backend: str | None = None
        self.log_path: Path | None = None
        self._log_file = None
        self._healthy = False  # answered its health check since it was started
        self._lock = threading.Lock()

    # -- public ----------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = self.settings.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def slots(self) -> int:
        return self.settings.slots if self.backend == "native" else 1

    @property
    def request_defaults(self) -> dict:
        """Settings every request should carry unless it sets them: llama_cpp.server's repetition penalty
        defaults to 1.1 where llama-server's is 1.0 (off), so a request that leaves it out would be decoded
        differently by the fallback; and the alias, which the fallback answers as only when asked by it."""
        if self.backend != "python":
            return {}
        # llama_cpp.server also answers with the request's "model" (its file path when there is none), where
        # llama-server answers with its alias whatever the request says.
        return {"repeat_penalty": 1.0, **({"model": self.settings.alias} if self.settings.alias else {})}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "ManagedServer":
        s = self.settings
        if s.host not in LOOPBACK and not s.api_key:
            raise BadInput(f"refusing to serve on {s.host} without an API key: pass --api-key, "
                           "or keep the default host 127.0.0.1")
        if s.alias is not None and (not s.alias.strip() or "," in s.alias):
            # llama-server reads a comma-separated list of names; one name is what a client can send back.
            raise BadInput(f"model alias {s.alias!r} must be one non-empty name without commas")
        if (s.model is None) == (s.models_dir is None):
            raise ValueError("a server serves one model or, as a router, a models folder: give one of them")
        if s.models_dir is not None:
            if not Path(s.models_dir).is_dir():
                raise BadInput(f"models folder {s.models_dir} does not exist: create it, or point --models-root at "
                               "the folder the run writes its models to")
            if s.lora or s.alias is not None or s.backend == "python":
                raise BadInput("a router serves the models in its folder by their names; its models carry no "
                               "adapters or alias, and only llama-server (not the python backend) is a router")
        else:
            read_gguf(s.model)
        for adapter in s.lora:
            read_gguf(adapter)
        self.backend = resolve_backend(s.backend)
        if s.models_dir is not None and self.backend != "native":
            raise ToolchainMissing("a router needs llama-server, which is not built: run `make setup`")
        if s.port is not None:
            check_port_free(s.host, s.port)
        self.port = s.port or free_port(s.host)
        cmd = self._command()
        self.log_path = s.log_path or Path(tempfile.gettempdir()) / f"isara-server-{os.getpid()}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=set_parent_death_signal, env=self._env(),
        )
        _LIVE.add(self)
        self._healthy = False
        try:
            self._wait_healthy()
            self._healthy = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`. A server that started, served and stopped when asked
        leaves no log in the temporary folder (a log of its own, `settings.log_path`, always stays); one
        that failed to start, died, or had to be killed keeps it, for the message that names it."""
        with self._lock:
            proc, self.proc = self.proc, None
            _LIVE.discard(self)
            asked = False
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                    asked = True
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            elif proc is not None:
                _signal_group(proc, signal.SIGKILL)  # children of a dead leader
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if asked and self._healthy and self.settings.log_path is None and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)

    def restart(self, model: str | Path | None = None, lora: list[Path] | None = None) -> "ManagedServer":
        """Stop and start again on the same port (a new GGUF, new adapters)."""
        port = self.port
        self.stop()
        changes = {"port": self.settings.port or port}
        if model is not None:
            changes["model"] = Path(model)
        if lora is not None:
            changes["lora"] = list(lora)
        self.settings = self.settings.model_copy(update=changes)
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - 16384))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> "ManagedServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals -------------------------------------------------------
    def _env(self) -> dict:
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"  # the python backend never reaches for a hub
        return env

    def _command(self) -> list[str]:
        s = self.settings
        if self.backend == "native":
            tc = find_toolchain()
            served = (["-m", str(s.model)] if s.models_dir is None else
                      ["--models-dir", str(Path(s.models_dir).resolve()), "--models-max", str(s.models_max),
                       "--no-models-autoload"])  # a request for a model not loaded is refused, never loads one
            cmd = [str(tc.llama_server), *served, "--host", s.host, "--port", str(self.port),
                   "-np", str(s.slots), "-c", str(s.slots * s.ctx_per_slot), "--no-webui", "--metrics"]
            for adapter in s.lora:
                cmd += ["--lora", str(adapter)]
            if s.threads:
                cmd += ["-t", str(s.threads), "-tb", str(s.threads)]
            if s.embeddings:
                cmd += ["--embeddings"]
            if s.alias:
                cmd += ["--alias", s.alias]
        else:
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(s.model), "--host", s.host,
                   "--port", str(self.port), "--n_ctx", str(s.ctx_per_slot)]
            if s.lora:
                if len(s.lora) > 1:
                    raise BadInput("the python server backend takes one LoRA adapter: merge them, or build llama-server")
                cmd += ["--lora_path", str(s.lora[0])]
            if s.threads:
                cmd += ["--n_threads", str(s.threads)]
            if s.embeddings:
                cmd += ["--embedding", "true"]
            if s.alias:
                cmd += ["--model_alias", s.alias]
        if s.api_key:
            cmd += ["--api-key" if self.backend == "native" else "--api_key", s.api_key]
        return cmd + list(s.extra_args)

    def _wait_healthy(self) -> None:
        s = self.settings
        deadline = time.monotonic() + s.startup_timeout
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        # llama-server answers /health; llama_cpp.server has no /health, /v1/models serves.
        path = "/health" if self.backend == "native" else "/v1/models"
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerStartError(
                        f"{self.backend} server exited with code {code} while starting on {s.serves} "
                        f"(log {self.log_path}):\n{self.log_tail()}")
                try:
                    if http.get(self.base_url + path, headers=headers).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{self.backend} server not healthy after {s.startup_timeout:.0f}s on {s.serves} "
                        f"(log {self.log_path}):\n{self.log_tail()}")
                time.sleep(0.1)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_LIVE: set[ManagedServer] = set()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop(timeout=5.0)
