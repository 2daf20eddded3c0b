"""What serves a run's models: its managed llama-server, the `isara worker`s of generation.workers, or
outside endpoints (generation.endpoints).

One `Serving` per session of a run: it starts the managed server on demand, restarts it when the model
changes, stops it while training and export want the cores, and hands every phase a client over
whatever serves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from server.client import Endpoint, InferenceClient
from server.process import ManagedServer, ServerSettings
from server.supervisor import Supervisor

from loop.config import RunConfig
from loop.events import Events
from loop.generation.workers import Workers
from loop.layout import RunLayout


class Serving:
    """What serves a run's models: its managed server (started on demand, restarted when the model changes),
    the `isara worker`s of generation.workers (each model loaded on all of them), or outside endpoints."""

    def __init__(self, cfg: RunConfig, layout: RunLayout, events: Events, base_name: Callable[[], str] = lambda: "base"):
        """`base_name`: the base model's name, asked when the base model is served (the run prepares it first)."""
        self.cfg, self.layout, self.events, self.base_name = cfg, layout, events, base_name
        self.server: ManagedServer | None = None
        self.supervisor: Supervisor | None = None
        self.workers = Workers(cfg.generation, events, layout.root) if cfg.generation.workers else None

    def name_of(self, model: Path, lora: list[Path]) -> str:
        """The name the server answers as, which every generated sample records: the base model's name, or the
        run's label of the export whose GGUF (or LoRA GGUF) it serves (`garden/iter-01`,
        `garden/baselines/sft-seeds`)."""
        made = Path(lora[-1] if lora else model)
        try:
            name = f"{self.layout.name}/{made.parent.relative_to(self.layout.root).as_posix()}"
        except ValueError:  # the base model's own GGUF, in the model store
            name = self.base_name()
        # llama-server reads a comma-separated list of names and trims each; argparse (the fallback) takes one
        # that starts with "-" for an option
        return name.replace(",", "_").strip().lstrip("-") or "base"

    def answers_as(self, model: Path, lora: list[Path]) -> str | None:
        """The name the model's server answers with (None: outside endpoints, whose models the run doesn't name)."""
        if self.cfg.generation.endpoints:
            return None
        return self.workers.name(self.name_of(model, lora), model) if self.workers else self.name_of(model, lora)

    def ensure(self, model: Path, lora: list[Path]) -> None:
        if self.cfg.generation.endpoints:
            return  # external endpoints serve; nothing to manage
        if self.workers is not None:
            self.workers.serve(model, self.name_of(model, lora))
            return
        if self.server is not None and self.server.alive() and self.server.settings.model == model \
                and list(self.server.settings.lora) == lora:
            return
        self.stop()
        g = self.cfg.generation
        settings = ServerSettings(model=model, lora=lora, slots=g.slots, ctx_per_slot=g.ctx_per_slot,
                                  threads=g.threads, log_path=self.layout.server_log,
                                  alias=self.name_of(model, lora))
        self.server = ManagedServer(settings).start()
        self.supervisor = Supervisor(self.server, max_restarts=g.max_restarts, interval=g.health_interval_s,
                                     hang_after=g.hang_timeout_s, on_restart=self._restarted)
        self.events.emit("server_started", url=self.server.base_url, slots=self.server.slots,
                         backend=self.server.backend, pid=self.server.pid, model=str(model),
                         name=settings.alias)

    def _restarted(self, restarts: int, reason: str) -> None:
        self.events.emit("server_restarted", restarts=restarts, reason=reason, pid=self.server.pid,
                         log=str(self.server.log_path))

    def stop(self) -> None:
        """Free this machine's cores and memory (training wants them). Workers keep their model loaded: idle it
        costs them no CPU (a worker on this host keeps its memory), and the next model replaces it."""
        if self.server is not None:
            self.server.stop()
            self.server = None
            self.supervisor = None

    def close(self) -> None:
        """The run is over (finished or stopped): nothing of it stays served."""
        self.stop()
        if self.workers is not None:
            self.workers.release()

    def client(self) -> InferenceClient:
        g = self.cfg.generation
        if self.workers is not None:
            return self.workers.client()
        if g.endpoints:
            return InferenceClient([Endpoint(u, slots=g.endpoint_slots, api_key=g.api_key) for u in g.endpoints],
                                   timeout=g.request_timeout_s)
        return InferenceClient([Endpoint(self.server.base_url, slots=self.server.slots,
                                         defaults=self.server.request_defaults)],
                               timeout=g.request_timeout_s, supervisor=self.supervisor)
