"""The live dashboard of `isara run`, rendered from events the way a run sends them, at 80 and 120 columns."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from conftest import first_of
from loop.dashboard import Dashboard

FOLDER = "/home/someone/isara/runs/safety"
GENERATION_FINISHED = {
    "iteration": 1, "accepted": 24, "attempts": 37, "acceptance_rate": 0.649, "accepted_per_minute": 30.8,
    "rejected_by_reason": {"near_duplicate": 10, "repetition": 2, "copied_demo": 1},
    "question_stage": {"prompt_tok_s": 348.2, "gen_tok_s": 46.5},
    "answer_stage": {"prompt_tok_s": 1234.5, "gen_tok_s": 41.3}}


def started(width: int) -> Dashboard:
    """A dashboard that has seen a run start, generate one iteration and finish its generation."""
    dash = Dashboard(Console(width=width, file=io.StringIO(), record=True))
    dash.update("run_started", {"run": "safety", "folder": FOLDER, "iterations": 3})
    dash.update("server_started", {"url": "http://127.0.0.1:36013", "slots": 8, "backend": "native", "pid": 1,
                                   "model": "/models/smollm2-135m/model.gguf"})
    dash.update("generation_started", {"iteration": 1, "target": 24})
    for reason, n in GENERATION_FINISHED["rejected_by_reason"].items():
        for i in range(n):
            dash.update("rejected", {"iteration": 1, "reason": reason, "attempt": i, "busy": 8, "slots": 8})
    dash.update("accepted", {"iteration": 1, "accepted": 24, "target": 24, "id": "g-1", "busy": 7, "slots": 8})
    dash.update("generation_finished", GENERATION_FINISHED)
    return dash


def train(dash: Dashboard) -> Dashboard:
    dash.update("train_started", {"iteration": 1, "samples": 88, "backend": "peft"})
    dash.update("train_step", {"iteration": 1, "step": 2, "steps": 40, "loss": 2.7, "tokens": 800, "seconds": 8.2,
                               "checkpoint": 2})
    dash.update("train_step", {"iteration": 1, "step": 3, "steps": 40, "loss": 2.5, "tokens": 1200, "seconds": 12.3})
    return dash


def screen(dash: Dashboard) -> list[str]:
    dash.console.print(dash.render())
    return dash.console.export_text().splitlines()


def shown_whole(lines: list[str], phrase: str) -> bool:
    return any(phrase in line for line in lines)


@pytest.mark.parametrize("width", [80, 120])
def test_no_phrase_is_split_across_lines(width):
    lines = screen(train(started(width)))
    assert max(len(line) for line in lines) <= width
    for phrase in ("question tokens/s: prompt 348.2 gen 46.5", "answer tokens/s: prompt 1234.5 gen 41.3",
                   "accepted 24/24", "slots busy 7/8", "rejected: near_duplicate 10", "repetition 2",
                   "server: paused for training (frees the cores)", f"resume: isara run {FOLDER}",
                   "iteration 1/3", "step 3/40", "loss 2.5000", "on 88 samples"):
        assert shown_whole(lines, phrase), phrase


def test_while_training_the_pace_the_eta_and_the_last_checkpoint_show():
    lines = screen(train(started(120)))
    # 3 steps in 12.3 s: 0.24 steps/s, 98 tok/s; 37 steps left at that pace are 2m31s.
    for phrase in ("0.24 steps/s", "98 tok/s", "ETA 2m31s", "checkpoint at step 2"):
        assert shown_whole(lines, phrase), phrase


def test_while_training_the_header_says_the_server_is_paused_not_that_the_run_stopped():
    generating = screen(started(120))
    assert shown_whole(generating, "server: native at http://127.0.0.1:36013, 8 slots")
    training = screen(train(started(120)))
    assert shown_whole(training, "server: paused for training (frees the cores)")
    assert not any("stopped" in line for line in training)


def test_a_worker_left_out_shows_until_it_answers_again():
    dash = started(80)
    a, b = "http://10.0.0.1:8090", "http://10.0.0.2:8090"
    dash.update("workers_serving", {"name": "safety--iter-01--3fa2c1d0", "workers": [a, b], "model": "x"})
    dash.update("worker_unavailable", {"url": b, "reason": "no answer to health checks for 61s (hung)"})
    lines = screen(dash)
    assert shown_whole(lines, "workers: 2 serving safety--iter-01--3fa2c1d0") and shown_whole(lines, f"left out: {b}")
    dash.update("worker_back", {"url": b})
    dash.console.export_text()  # forget the earlier frame
    assert not shown_whole(screen(dash), f"left out: {b}")  # (the log below still tells what happened)


def test_the_resume_command_shows_until_the_run_finishes_then_the_report_instead():
    dash = train(started(120))
    assert shown_whole(screen(dash), f"resume: isara run {FOLDER}")
    dash.update("run_finished", {"run": "safety", "folder": FOLDER, "report": f"{FOLDER}/report.md"})
    dash.console.export_text()  # forget the earlier frame
    lines = screen(dash)
    assert not shown_whole(lines, "resume:")
    assert shown_whole(lines, f"report: {FOLDER}/report.md")


@pytest.mark.parametrize("width", [80, 120])
def test_the_evaluation_panel_shows_the_held_out_scores_and_only_the_rates_a_run_has(width):
    dash = started(width)
    dash.update("eval_finished", {"label": "base", "harmful_rate": None, "over_refusal": None,
                                  "degenerate_rate": None, "seconds": 2.8,
                                  "holdout": {"n": 2, "rouge_l": 0.14, "cosine": 0.51, "loss": 3.55}})
    dash.update("eval_finished", {"label": "iter-01", "harmful_rate": 0.2, "over_refusal": 0.1,
                                  "degenerate_rate": 0.0, "seconds": 40})
    lines = screen(dash)
    assert max(len(line) for line in lines) <= width
    for phrase in ("holdout ROUGE-L 0.14", "cosine 0.51", "loss 3.55", "harmful 20%", "over-refusal 10%"):
        assert shown_whole(lines, phrase), phrase
    base = first_of((line for line in lines if "holdout ROUGE-L" in line), "\n".join(lines))
    assert "harmful" not in base  # a run without eval sets has no rates to show as "-"
