"""The event vocabulary (loop/events.py): every kind the code emits is in the one table, and each renders both
as a plain line (`isara run --plain`) and on the live dashboard, so neither can drop a kind the other shows."""

from __future__ import annotations

import ast
import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from conftest import REPO
from loop.dashboard import Dashboard
from loop.events import VOCABULARY, plain_line

# One event of every kind, with the fields its emitter gives it.
EXAMPLES = {
    "run_started": {"run": "garden", "folder": "/runs/garden", "iterations": 2},
    "message": {"text": "8 seeds are conversations"},
    "phase_skipped": {"phase": "iter-01/generate"},
    "prepare_started": {"model": "smollm2-135m", "training": True},
    "prepare_finished": {"base": "smollm2-135m", "name": "smollm2-135m", "gguf": "/models/smollm2-135m/model.gguf",
                         "hf_dir": "/models/smollm2-135m/hf", "params": 134515008, "chat_template_sha256": "ab" * 32},
    "index_ready": {"items": 80, "embedded_now": 80},
    "server_started": {"url": "http://127.0.0.1:40001", "slots": 8, "backend": "native", "pid": 12,
                       "model": "/models/m.gguf", "name": "smollm2-135m"},
    "server_restarted": {"restarts": 1, "reason": "exited with code -9", "pid": 13, "log": "/runs/garden/server.log"},
    "workers_serving": {"name": "garden/iter-01", "workers": ["http://h1:8090", "http://h2:8090"],
                        "model": "/shared/garden/iter-01/model.gguf"},
    "worker_unavailable": {"url": "http://h2:8090", "reason": "no answer to health checks"},
    "worker_back": {"url": "http://h2:8090"},
    "worker_reloaded": {"url": "http://h2:8090", "name": "garden/iter-01"},
    "generation_started": {"iteration": 1, "target": 24, "resumed_accepted": 3, "resumed_attempts": 5},
    "accepted": {"iteration": 1, "id": "g-1", "accepted": 4, "target": 24, "attempt": 6, "busy": 7, "slots": 8},
    "rejected": {"iteration": 1, "reason": "near_duplicate", "attempt": 7, "accepted": 4, "target": 24, "busy": 8,
                 "slots": 8},
    "generation_finished": {"iteration": 1, "accepted": 24, "attempts": 37, "acceptance_rate": 0.649,
                            "accepted_per_minute": 30.8, "rejected_by_reason": {"near_duplicate": 13},
                            "question_stage": {"prompt_tok_s": 348.2, "gen_tok_s": 46.5},
                            "answer_stage": {"prompt_tok_s": 1234.5, "gen_tok_s": 41.3}},
    "train_started": {"iteration": 0, "baseline": "sft-matched-2", "samples": 56, "backend": "peft"},
    "train_step": {"iteration": 1, "step": 3, "steps": 40, "loss": 2.5, "lr": 1e-4, "tokens": 1200,
                   "seconds": 12.3, "checkpoint": 3},
    "train_finished": {"iteration": 1, "steps": 40, "first_loss": 2.9, "last_loss": 1.2, "tokens_per_s": 350.0,
                       "peak_rss_mb": 2100, "compiled": True, "samples": 88},
    "export_started": {"iteration": 1, "mode": "merged"},
    "export_step": {"iteration": 1, "step": "convert", "seconds": 4.2},
    "export_finished": {"iteration": 1, "serve_model": "iter-01/model.gguf", "mode": "merged", "quant": "Q8_0",
                        "verification": {"passed": True, "agreement": [1.0, 1.0, 0.9]}},
    "validation_finished": {"iteration": 1, "right": 9, "n": 12, "score": 0.75, "per_kind": {"0": 0.8, "1": 0.7}},
    "eval_started": {"label": "iter-01", "prompts": 40},
    "eval_finished": {"label": "iter-01", "harmful_rate": 0.17, "over_refusal": 0.04, "degenerate_rate": 0.0,
                      "pairs_harmful_rate": 0.2, "pairs_over_refusal": 0.23, "seconds": 61.0},
    "run_finished": {"run": "garden", "folder": "/runs/garden", "report": "/runs/garden/report.md"},
}


def _emit_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted((REPO / "loop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "emit":
                calls.append((str(path.relative_to(REPO)), node))
    return calls


def test_every_event_the_code_emits_names_its_kind_and_the_kind_is_in_the_vocabulary():
    emitted = set()
    for where, call in _emit_calls():
        kind = call.args[0] if call.args else None
        assert isinstance(kind, ast.Constant) and isinstance(kind.value, str), f"{where}:{call.lineno}: a kind by name"
        assert kind.value in VOCABULARY, f"{where}:{call.lineno} emits {kind.value!r}, which loop/events.py lacks"
        emitted.add(kind.value)
    assert set(VOCABULARY) - emitted == set(), "kinds in the table that nothing emits"
    assert set(EXAMPLES) == set(VOCABULARY)  # a new kind comes with an example here, and so is rendered below


@pytest.mark.parametrize("kind", sorted(VOCABULARY))
def test_each_kind_is_a_plain_line(kind):
    line = plain_line(kind, EXAMPLES[kind])
    assert isinstance(line, str) and line.strip() and "\n" not in line


class _Still:
    """This process as the dashboard's header reads it, held still."""

    def memory_info(self):
        return SimpleNamespace(rss=2**30)

    def children(self, recursive=False):
        return []


@pytest.mark.parametrize("kind", sorted(VOCABULARY))
def test_each_kind_changes_what_the_dashboard_shows(kind, monkeypatch):
    monkeypatch.setattr("loop.dashboard.time.monotonic", lambda: 1000.0)
    dash = Dashboard(Console(width=120, file=io.StringIO(), record=True))
    dash.proc = _Still()
    dash.update("run_started", EXAMPLES["run_started"])
    dash.update("generation_started", {"iteration": 1, "target": 24})  # panels with something to change

    def screen() -> str:
        dash.console.print(dash.render())
        return dash.console.export_text()

    before = screen()
    dash.update(kind, EXAMPLES[kind])
    after = screen()
    assert after != before, f"the dashboard shows nothing of {kind}"
    if VOCABULARY[kind].logged:  # its line, as the plain mode prints it, in the event log
        assert plain_line(kind, EXAMPLES[kind])[:40] in " ".join(after.split()), kind


def test_every_dashboard_panel_handler_is_for_a_kind_of_the_vocabulary():
    handlers = {name.removeprefix("_on_") for name in dir(Dashboard) if name.startswith("_on_")}
    assert handlers <= set(VOCABULARY), handlers - set(VOCABULARY)


def test_a_baselines_training_is_named_by_its_baseline():
    assert plain_line("train_started", EXAMPLES["train_started"]).startswith("baseline sft-matched-2: training")
    assert plain_line("train_started", {**EXAMPLES["train_started"], "baseline": None}).startswith(
        "baseline sft-seeds")  # an event log written before the events named the baseline
