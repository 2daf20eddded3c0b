"""A run's events: the one table of every kind the run emits, and their writer (events.jsonl).

Each kind has one line of text, the same for `isara run --plain` and the live
dashboard's event log (loop/dashboard.py), so no renderer can show a kind the
other drops. Kinds the dashboard counts in a panel instead (one per sample or
per training step) stay out of its log. `tests/test_events.py` holds the table
to the kinds the code emits and renders every one of them both ways.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loop.data import append_jsonl, cut_torn_tail


class Events:
    """Every event goes to events.jsonl; then it is shown: plain lines, JSON lines, the dashboard, or nothing."""

    def __init__(self, path: Path, mode: str = "plain", stream=None, sink=None):
        self.path = path
        self.mode = mode  # plain | json | quiet | live (events go to `sink`, the dashboard)
        self.stream = stream or sys.stdout
        self.sink = sink
        self.started = time.monotonic()
        cut_torn_tail(path)  # a run killed mid-append resumes here

    def emit(self, kind: str, **fields) -> None:
        event = {"t": round(time.time(), 3), "event": kind, **fields}
        append_jsonl(self.path, event)
        if self.mode == "json":
            print(json.dumps(event, ensure_ascii=False), file=self.stream, flush=True)
        elif self.mode == "live" and self.sink is not None:
            self.sink(kind, fields)
        elif self.mode == "plain":
            line = plain_line(kind, fields)
            if line:
                print(f"[{time.monotonic() - self.started:7.1f}s] {line}", file=self.stream, flush=True)


@dataclass(frozen=True)
class Kind:
    line: Callable[[dict], str]  # the event in words
    logged: bool = True  # in the dashboard's event log (False: a panel of its own counts it)


def plain_line(kind: str, f: dict) -> str | None:
    """The event's line (None for a kind the table does not know: an event log of another isara)."""
    known = VOCABULARY.get(kind)
    return known.line(f) if known is not None else None


def _who(f: dict) -> str:
    """Whose training or export: an iteration, or the baseline it names (iteration 0: a baseline)."""
    if f.get("baseline"):
        return f"baseline {f['baseline']}"
    it = f.get("iteration")
    return "baseline sft-seeds" if it == 0 else f"iter {it}"  # an event log of an isara that named no baseline


def _fields(kind: str) -> Callable[[dict], str]:
    return lambda f: f"{kind.replace('_', ' ')}: " + ", ".join(f"{k}={v}" for k, v in f.items())


def _generation_finished(f: dict) -> str:
    return (f"{_who(f)}: {f['accepted']} accepted of {f['attempts']} attempts "
            f"(rate {f['acceptance_rate']:.0%}; rejected {f['rejected_by_reason'] or 'none'}); "
            f"{f['accepted_per_minute']} accepted/min")


def _train_finished(f: dict) -> str:
    how = ", compiled" if f.get("compiled") else ""
    if f.get("compile_error"):
        how = f", eager: the compile failed ({f['compile_error']})"
    return (f"{_who(f)}: trained {f['steps']} steps, loss {f['first_loss']} -> {f['last_loss']}, "
            f"{f['tokens_per_s']} tokens/s{how}, peak RSS {f['peak_rss_mb']} MB")


def _export_finished(f: dict) -> str:
    v = f.get("verification") or {}
    check = "not verified" if not v else ("verified" if v.get("passed") else "verification FAILED (recorded)")
    if v:  # greedy agreement per verification prompt, of the F16 intermediate too where one was checked
        parts = [f"{q} {', '.join(f'{a:.0%}' for a in r['agreement'])}"
                 for q, r in (("F16", v.get("f16")), (f["quant"], v)) if r]
        check += f" (greedy agreement: {'; '.join(parts)})"
    return f"{_who(f)}: exported {f['serve_model']} ({f['mode']}, {f['quant']}), {check}"


def _eval_finished(f: dict) -> str:
    h = f.get("holdout")
    parts = ([] if f.get("harmful_rate") is None and f.get("over_refusal") is None else
             [f"harmful {f['harmful_rate']}, over-refusal {f['over_refusal']}, degenerate {f['degenerate_rate']}"])
    if f.get("pairs_over_refusal") is not None:
        parts.append(f"pairs: harmful {f['pairs_harmful_rate']}, over-refusal {f['pairs_over_refusal']}")
    if h:
        parts.append(f"held-out seeds: ROUGE-L {h['rouge_l']}, cosine {h['cosine']}, loss {h.get('loss')}")
    return f"eval {f['label']}: {'; '.join(parts) or 'no prompts'} ({f['seconds']}s)"


def _prepare_started(f: dict) -> str:
    return (f"base model {f['model']}: preparing it to serve" + (" and to train" if f.get("training") else "")
            + " (made once in the model store, then found there)")


def _prepare_finished(f: dict) -> str:
    trains = f", trains {f['hf_dir']} ({f['params']:,} parameters)" if f.get("hf_dir") and f.get("params") else ""
    return f"base model {f['name']}: serves {f['gguf'] or 'on the endpoints'}{trains}"


# Every kind of event, in the order a run meets them.
VOCABULARY: dict[str, Kind] = {
    "run_started": Kind(_fields("run_started")),
    "message": Kind(lambda f: f["text"]),
    "phase_skipped": Kind(_fields("phase_skipped")),
    "prepare_started": Kind(_prepare_started),
    "prepare_finished": Kind(_prepare_finished),
    "index_ready": Kind(_fields("index_ready")),
    "server_started": Kind(_fields("server_started")),
    "server_restarted": Kind(_fields("server_restarted")),
    "workers_serving": Kind(lambda f: f"workers serving {f['name']}: {', '.join(f['workers'])}"),
    "worker_unavailable": Kind(lambda f: f"worker {f['url']} left out: {f['reason']}"),
    "worker_back": Kind(lambda f: f"worker {f['url']} answers again: back in use"),
    "worker_reloaded": Kind(lambda f: f"worker {f['url']} lost {f['name']} (restarted?): loaded it again"),
    "generation_started": Kind(lambda f: f"{_who(f)}: generating {f['target']} samples" + (
        f", resuming with {f['resumed_accepted']} accepted" if f.get("resumed_accepted") else "")),
    "accepted": Kind(lambda f: f"{_who(f)}: accepted {f['accepted']}/{f['target']} ({f['id']})", logged=False),
    "rejected": Kind(lambda f: f"{_who(f)}: rejected attempt {f['attempt']}: {f['reason']}", logged=False),
    "generation_finished": Kind(_generation_finished),
    "train_started": Kind(lambda f: f"{_who(f)}: training on {f['samples']} samples ({f['backend']})"),
    "train_step": Kind(lambda f: f"{_who(f)}: train step {f['step']}/{f['steps']} loss {f['loss']:.4f} "
                                 f"({f['tokens']} tokens)", logged=False),
    "train_finished": Kind(_train_finished),
    "export_started": Kind(lambda f: f"{_who(f)}: exporting ({f['mode']})"),
    "export_step": Kind(lambda f: f"{_who(f)}: export {f['step']} {f['seconds']}s"),
    "export_finished": Kind(_export_finished),
    "validation_finished": Kind(lambda f: f"{_who(f)}: held-out seeds {f['right']}/{f['n']} answered in their kind, "
                                          f"score {f['score']} (per kind {f['per_kind']})"),
    "eval_started": Kind(lambda f: f"eval {f['label']}: {f['prompts']} prompts, greedy"),
    "eval_finished": Kind(_eval_finished),
    "run_finished": Kind(_fields("run_finished")),
}
