"""The live terminal dashboard of `isara run` (rich).

It is fed by the same events that go to events.jsonl (each kind's panel is its `_on_<kind>` method, its
line in the event log the one loop/events.py gives it), and only keeps a few
counters per event; rendering happens on rich's refresh thread, 4 times a
second, so the hot paths (generation, training) pay nothing for it.
"""

from __future__ import annotations

import time
from collections import Counter, deque

import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel

from loop.events import VOCABULARY
from loop.fit import Phrases

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(7, int((v - lo) / span * 7.999))] for v in values)


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def _bar(done: int, total: int, width: int = 30) -> str:
    """A progress bar as text, so that it packs into a line with the figures beside it."""
    filled = min(width, round(width * done / max(1, total)))
    return f"[green]{'━' * filled}[/][bright_black]{'━' * (width - filled)}[/]"


class Dashboard:
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.started = time.monotonic()
        self.run, self.folder, self.iterations = "", "", 0
        self.iteration, self.phase = 0, "starting"
        self.accepted = self.target = self.attempts = 0
        self.reasons: Counter = Counter()
        self.gen_started = None
        self.gen_summary: dict = {}
        self.base = ""  # the base model, once the run prepares it (phase base-model/prepare)
        self.server = ""  # what the run's llama-server is doing, in words (empty: no managed server yet)
        self.workers = ""  # with generation.workers: how many serve which model
        self.workers_out: set[str] = set()  # URLs of the workers left out now (down, hung; the log says why)
        self.report = ""
        self.losses: list[float] = []
        self.train = {}
        self.export_steps: list[str] = []
        self.verification = ""
        self.busy: tuple = (None, None)  # requests in flight, slots (from the latest sample event)
        self.evals: dict[str, dict] = {}  # label -> rates, in arrival order
        self.eval_running = ""
        self.log = deque(maxlen=6)
        self.proc = psutil.Process()
        self.live = Live(console=self.console, refresh_per_second=4, get_renderable=self.render, transient=False)

    def __enter__(self) -> "Dashboard":
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()

    # -- events ----------------------------------------------------------
    def update(self, kind: str, f: dict) -> None:
        """One event: the panels its kind feeds (`_on_<kind>`), and its line (loop/events.py) in the event log."""
        it = f.get("iteration")
        if it:
            self.iteration = it
        panel = getattr(self, f"_on_{kind}", None)
        if panel is not None:
            panel(f)
        known = VOCABULARY.get(kind)
        if known is not None and known.logged:  # the same one-line text the plain mode prints
            self.log.append(f"{_duration(time.monotonic() - self.started)}  {known.line(f)}")

    def _on_run_started(self, f: dict) -> None:
        self.run, self.folder, self.iterations = f["run"], f["folder"], f["iterations"]

    def _on_prepare_started(self, f: dict) -> None:
        self.phase = "prepare"
        self.base = f"base model: {f['model']}, being prepared"

    def _on_prepare_finished(self, f: dict) -> None:
        self.base = f"base model: {f['name']}" + (f", {f['params']:,} parameters" if f.get("params") else "")

    def _on_server_started(self, f: dict) -> None:
        self.server = f"server: {f['backend']} at {f['url']}, {f['slots']} slots"

    def _on_workers_serving(self, f: dict) -> None:
        self.workers = f"workers: {len(f['workers'])} serving {f['name']}"
        self.workers_out -= set(f["workers"])

    def _on_worker_unavailable(self, f: dict) -> None:
        self.workers_out.add(f["url"])

    def _on_worker_back(self, f: dict) -> None:
        self.workers_out.discard(f["url"])

    _on_worker_reloaded = _on_worker_back

    def _on_generation_started(self, f: dict) -> None:
        self.phase = "generate"
        self.accepted, self.target = f.get("resumed_accepted", 0), f["target"]
        self.attempts = f.get("resumed_attempts", 0)
        self.reasons.clear()
        self.gen_started, self.gen_base = time.monotonic(), self.accepted
        self.gen_summary = {}

    def _on_accepted(self, f: dict) -> None:
        self.accepted, self.attempts = f["accepted"], self.attempts + 1
        self.busy = (f.get("busy"), f.get("slots"))

    def _on_rejected(self, f: dict) -> None:
        self.reasons[f["reason"]] += 1
        self.attempts += 1
        self.busy = (f.get("busy"), f.get("slots"))

    def _on_generation_finished(self, f: dict) -> None:
        self.gen_summary = f

    def _on_train_started(self, f: dict) -> None:
        self.phase, self.losses, self.train = "train", [], {"samples": f["samples"]}
        self._pause_server("training")

    def _on_train_step(self, f: dict) -> None:
        self.losses.append(f["loss"])
        self.train.update(step=f["step"], steps=f["steps"], tokens=f.get("tokens"), seconds=f.get("seconds"))
        if f.get("checkpoint"):
            self.train["checkpoint"] = f["checkpoint"]

    def _on_train_finished(self, f: dict) -> None:
        self.train.update(done=True, tokens_per_s=f["tokens_per_s"], rss=f["peak_rss_mb"], vram=f.get("peak_vram_mb"))

    def _on_export_started(self, f: dict) -> None:
        self.phase, self.export_steps, self.verification = "export", [], ""
        self._pause_server("export")

    def _on_export_step(self, f: dict) -> None:
        self.export_steps.append(f"{f['step']} {f['seconds']}s")

    def _on_export_finished(self, f: dict) -> None:
        v = f.get("verification") or {}
        self.verification = "verified" if v.get("passed") else ("not verified" if not v else "FAILED")

    def _on_eval_started(self, f: dict) -> None:
        self.phase, self.eval_running = "eval", f"{f['label']}: {f['prompts']} prompts..."

    def _on_eval_finished(self, f: dict) -> None:
        self.evals[f["label"]] = f
        self.eval_running = ""

    def _on_run_finished(self, f: dict) -> None:
        self.phase, self.report = "finished", f.get("report", "")
        if self.server:
            self.server = "server: stopped (the run is over)"

    def _pause_server(self, phase: str) -> None:
        # The run stops its server while it trains and exports; said so that it can't read as the run stopping.
        if self.server:  # only a managed server (not external endpoints) is ever paused
            self.server = f"server: paused for {phase} (frees the cores)"

    # -- rendering -------------------------------------------------------
    def render(self):
        # Every line is a list of phrases packed to the width it gets: a phrase is never broken in two.
        return Group(
            Panel(Group(*self._header()), title="isara run", border_style="cyan"),
            Panel(Group(*self._generation()), title=f"generation (iteration {self.iteration})"),
            Panel(Group(*self._training()), title="training and export"),
            Panel(Group(*self._evaluation()) if self.evals or self.eval_running else "-",
                  title="evaluation (lower is better)"),
            Panel("\n".join(self.log) or "-", title="events"),
        )

    def _header(self) -> list:
        elapsed = time.monotonic() - self.started
        rss = self.proc.memory_info().rss
        try:
            rss += sum(c.memory_info().rss for c in self.proc.children(recursive=True))
        except psutil.Error:
            pass
        lines = [Phrases([f"[bold]{self.run}[/]", f"phase [bold cyan]{self.phase}[/]",
                          f"iteration [bold]{self.iteration}/{self.iterations}[/]", f"elapsed {_duration(elapsed)}",
                          f"RAM {rss / 2**30:.1f} GiB"])]
        if self.base:
            lines.append(Phrases([self.base]))
        if self.server:
            lines.append(Phrases([self.server]))
        if self.workers:
            lines.append(Phrases([self.workers, *(f"left out: {url}" for url in sorted(self.workers_out))]))
        if self.phase == "finished":  # nothing left to resume: say where the result is
            lines.append(Phrases([f"report: {self.report}" if self.report else ""]))
        elif self.folder:  # resumable from the first event until the run finishes
            lines.append(Phrases([f"resume: isara run {self.folder}"]))
        return lines

    def _generation(self) -> list:
        rate = self.accepted / self.attempts if self.attempts else 0.0
        per_min, eta = 0.0, "-"
        if self.gen_summary:  # finished: the phase's own figure, not one that decays with the clock
            per_min = self.gen_summary.get("accepted_per_minute") or 0.0
        elif self.gen_started and self.accepted > self.gen_base and time.monotonic() > self.gen_started:
            minutes = (time.monotonic() - self.gen_started) / 60  # > 0: a coarse clock can tick once for both
            per_min = (self.accepted - self.gen_base) / minutes
            remaining = max(0, self.target - self.accepted)
            eta = _duration(remaining / per_min * 60) if per_min else "-"
        busy = f"slots busy {self.busy[0]}/{self.busy[1]}" if self.busy[0] is not None else ""
        lines = [Phrases([_bar(self.accepted, self.target), f"accepted [bold]{self.accepted}/{self.target}[/]",
                          f"attempts {self.attempts}", f"rate {rate:.0%}", f"{per_min:.1f}/min", f"ETA {eta}",
                          busy])]
        reasons = [f"{k} {v}" for k, v in self.reasons.most_common()] or ["none"]
        lines.append(Phrases([f"rejected: {reasons[0]}", *reasons[1:]], sep=", "))
        if self.gen_summary:
            q, a = self.gen_summary.get("question_stage", {}), self.gen_summary.get("answer_stage", {})
            lines.append(Phrases([f"{name} tokens/s: prompt {st.get('prompt_tok_s')} gen {st.get('gen_tok_s')}"
                                  for name, st in (("question", q), ("answer", a))]))
        return lines

    def _training(self) -> list:
        lines = []
        if self.train:
            step = f"step {self.train.get('step', 0)}/{self.train.get('steps', '?')}"
            loss = f"loss {self.losses[-1]:.4f}" if self.losses else "loss -"
            if self.train.get("done"):
                vram = f"peak VRAM {self.train['vram']} MB" if self.train.get("vram") else ""
                speed = [f"{self.train['tokens_per_s']} tok/s", f"peak RSS {self.train['rss']} MB", vram]
            else:
                speed = self._training_speed()
            # A dashboard can open on a run already training (its train_started before it): no count then.
            samples = f"on {self.train['samples']} samples" if "samples" in self.train else ""
            lines += [Phrases([step, loss, *speed, samples]), sparkline(self.losses)]
        verification = f"[bold]{self.verification}[/]" if self.verification else ""
        if self.export_steps or verification:
            lines.append(Phrases([*self.export_steps, verification], sep=" · "))
        return lines or ["-"]

    def _training_speed(self) -> list[str]:
        """While training: steps/s and tokens/s so far, the ETA at that pace, the last mid-epoch checkpoint."""
        t = self.train
        seconds, step, steps = t.get("seconds") or 0, t.get("step", 0), t.get("steps")
        out = [f"{t.get('tokens') or 0} tokens in {seconds}s"]
        if seconds and step:
            out.append(f"{step / seconds:.2f} steps/s")
            if t.get("tokens"):
                out.append(f"{t['tokens'] / seconds:.0f} tok/s")
            if steps:
                out.append(f"ETA {_duration((steps - step) * seconds / step)}")
        if t.get("checkpoint"):
            out.append(f"checkpoint at step {t['checkpoint']}")
        return out

    def _evaluation(self) -> list:
        lines = [Phrases([label, *_rates(e), *_holdout_phrases(e.get("holdout")), f"{e.get('seconds')}s"])
                 for label, e in self.evals.items()]
        if self.eval_running:
            lines.append(Phrases([self.eval_running]))
        return lines


def _rates(e: dict) -> list[str]:
    """The refusal rates, where the run has those eval sets (a run scored on held-out seeds alone has none)."""
    if all(e.get(k) is None for k in ("harmful_rate", "over_refusal", "degenerate_rate")):
        return []
    return [f"harmful {_pct(e.get('harmful_rate'))}", f"over-refusal {_pct(e.get('over_refusal'))}",
            f"degenerate {_pct(e.get('degenerate_rate'))}"]


def _holdout_phrases(h: dict | None) -> list[str]:
    if not h:
        return []
    return [f"holdout ROUGE-L {h['rouge_l']:.2f}", f"cosine {h['cosine']:.2f}",
            *([f"loss {h['loss']:.2f}"] if h.get("loss") is not None else [])]
