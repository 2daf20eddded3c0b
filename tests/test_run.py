"""`isara run` end to end on the real default model, real embeddings, real index."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (DATA_ONLY, REPO, assert_one_line_error, first_of, jsonl_rows, pid_alive, run_config, run_isara,
                      tiny_seeds)


def _config(tmp_path: Path, **settings) -> Path:
    return run_config(tmp_path, {**DATA_ONLY, **settings})


@pytest.fixture(scope="module")
def finished_run(default_model, toolchain, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = _config(tmp)
    out = run_isara("run", str(cfg), "--plain", env={"COLUMNS": "80"})  # piped into a log, 80 columns
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "runs" / "garden", cfg, out


def test_a_data_only_run_writes_the_run_layout(finished_run):
    run, _, _ = finished_run
    for name in ("config.toml", "seeds.jsonl", "state.json", "events.jsonl", "index.usearch", "index.items.jsonl",
                 "iter-01/generated.jsonl", "iter-01/rejected.jsonl", "iter-01/stats.json", "iter-02/stats.json"):
        assert (run / name).exists(), name
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished"
    assert set(state["phases"]) == {"seeds", "base-model/prepare", "iter-01/generate", "iter-02/generate"}
    config = (run / "config.toml").read_text()
    assert "mmr_lambda" in config and "max_question_rouge_l" in config  # resolved: defaults filled in


def test_each_iteration_reaches_its_target_with_unique_well_formed_samples(finished_run):
    run, _, _ = finished_run
    ids = []
    for t in (1, 2):
        rows = jsonl_rows(run / f"iter-0{t}" / "generated.jsonl")
        assert len(rows) == 4
        for r in rows:
            assert r["prompt"].strip() and r["response"].strip() and r["iteration"] == t
            assert "Question:" not in r["prompt"] + r["response"] and "Answer:" not in r["response"]
            assert len(r["question_demo_ids"]) == 4 and len(r["answer_demo_ids"]) == 4
        ids += [r["id"] for r in rows]
    assert len(ids) == len(set(ids))


def test_every_candidate_is_counted_as_accepted_or_rejected_by_reason(finished_run):
    run, _, _ = finished_run
    for t in (1, 2):
        stats = json.loads((run / f"iter-0{t}" / "stats.json").read_text())
        rejected = jsonl_rows(run / f"iter-0{t}" / "rejected.jsonl")
        assert stats["accepted"] == 4 and stats["rejected"] == len(rejected)
        assert stats["attempts"] == stats["accepted"] + stats["rejected"]
        assert sum(stats["rejected_by_reason"].values()) == len(rejected)
        assert all(r["reason"] in ("parse", "too_short", "too_long", "repetition", "near_duplicate", "copied_demo")
                   for r in rejected)
        assert stats["question_stage"]["prompt_tokens"] > 0 and stats["answer_stage"]["completion_tokens"] > 0
        # the prompt tokens llama-server took from its prompt cache (every prompt starts with the same marker)
        stages = (stats["question_stage"], stats["answer_stage"])
        assert all(0 <= s["cached_tokens"] < s["prompt_tokens"] for s in stages)
        assert any(s["cached_tokens"] for s in stages)
        assert stats["scaling_ratio"] == 4 * t / 8  # accepted generated samples so far / seeds


def test_every_sample_records_the_model_and_server_that_wrote_it_and_stats_count_them(finished_run):
    run, _, _ = finished_run
    for t in (1, 2):  # a data-only run: both iterations generate with the base model
        accepted = jsonl_rows(run / f"iter-0{t}" / "generated.jsonl")
        rejected = jsonl_rows(run / f"iter-0{t}" / "rejected.jsonl")
        for r in accepted:
            assert set(r["generated_by"]) == {"question", "answer"}
        for r in accepted + rejected:
            for by in r["generated_by"].values():
                assert by["model"] == "smollm2-135m" and by["endpoint"].startswith("http://127.0.0.1:"), r
        stats = json.loads((run / f"iter-0{t}" / "stats.json").read_text())
        assert stats["served_as"] == "smollm2-135m"
        assert stats["samples_by_model"] == {"smollm2-135m": {"accepted": 4, "rejected": len(rejected)}}
        by_endpoint = stats["samples_by_endpoint"].values()
        assert sum(c["accepted"] for c in by_endpoint) == 4 and sum(c["rejected"] for c in by_endpoint) == len(rejected)


@pytest.mark.pipeline
def test_a_run_on_outside_endpoints_records_the_model_they_answered_as(default_model, toolchain, tmp_path):
    # generation.endpoints: servers the run does not manage, holding whatever model they hold. The samples say
    # which (the name the server answered with), and stats.json names no GGUF of the run's own.
    from server.process import ManagedServer, ServerSettings

    with ManagedServer(ServerSettings(model=default_model.gguf, slots=2, alias="theirs")) as outside:
        cfg = _config(tmp_path, iterations=1, **{"generation.endpoints": [outside.base_url],
                                                 "generation.endpoint_slots": 2})
        out = run_isara("run", str(cfg), "--plain")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "garden"
    rows = jsonl_rows(run / "iter-01" / "generated.jsonl") + jsonl_rows(run / "iter-01" / "rejected.jsonl")
    assert {by["model"] for r in rows for by in r["generated_by"].values()} == {"theirs"}
    stats = json.loads((run / "iter-01" / "stats.json").read_text())
    assert stats["model"] is None and stats["served_as"] is None
    assert stats["samples_by_model"] == {"theirs": {"accepted": 4, "rejected": stats["rejected"]}}
    assert list(stats["samples_by_endpoint"]) == [outside.base_url]
    # ... and its data set says so too, row by row and in the card
    assert run_isara("export", str(run), "--format", "dataset", "--to", str(tmp_path / "data")).returncode == 0
    generated = [r for r in _load_every_form(tmp_path / "data")["parquet"] if r["source"] == "generated"]
    assert len(generated) == 4 and {r["generated_by"] for r in generated} == {"theirs"}
    assert "| 1 | theirs | 4 |" in (tmp_path / "data" / "README.md").read_text()


def test_accepted_samples_are_indexed_and_iteration_two_retrieves_them(finished_run):
    run, _, _ = finished_run
    items = jsonl_rows(run / "index.items.jsonl")
    first = {r["id"] for r in jsonl_rows(run / "iter-01" / "generated.jsonl")}
    assert len(items) == 8 + 8 and first <= {it["id"] for it in items}
    used = set()
    for r in jsonl_rows(run / "iter-02" / "generated.jsonl") + jsonl_rows(run / "iter-02" / "rejected.jsonl"):
        used |= set(r.get("question_demo_ids", [])) | set(r.get("answer_demo_ids", [])) | {r.get("anchor_id")}
    assert used & first


def test_status_reads_a_finished_run_from_its_files(finished_run):
    run, _, _ = finished_run
    out = run_isara("status", "--json", str(run))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)[0]
    assert summary["status"] == "finished"
    assert [(r["iteration"], r["accepted"], r["phases_done"]) for r in summary["iterations"]] == [
        ("iter-01", 4, ["generate"]), ("iter-02", 4, ["generate"])]


def _fits(text: str, width: int) -> bool:
    return all(len(line) <= width for line in text.splitlines()) and "…" not in text


def test_piped_the_results_table_fits_80_columns_with_every_value_whole(finished_run):
    _, _, out = finished_run
    table = out.stdout[out.stdout.index("isara: results"):]
    assert _fits(table, 80), table
    assert "isara iter 1" in table and "isara iter 2" in table and "1.00x" in table


def test_piped_status_fits_80_columns_with_every_value_whole(finished_run):
    run, _, _ = finished_run
    out = run_isara("status", str(run), env={"COLUMNS": "80"})
    assert out.returncode == 0 and _fits(out.stdout, 80), out.stdout
    assert "iter-01" in out.stdout and "iter-02" in out.stdout and "4/4" in out.stdout


def test_running_a_finished_run_again_skips_every_phase(finished_run):
    run, cfg, _ = finished_run
    before = (run / "iter-02" / "generated.jsonl").read_bytes()
    out = run_isara("run", str(cfg), "--plain")
    assert out.returncode == 0, out.stderr
    skipped = re.findall(r"phase skipped: phase=(\S+)", out.stdout)
    assert skipped == ["base-model/prepare", "iter-01/generate", "iter-02/generate"], out.stdout  # the whole plan
    assert "server started" not in out.stdout
    assert (run / "iter-02" / "generated.jsonl").read_bytes() == before


def _kill_once_accepted(cfg: Path, gen: Path, accepted: int, env: dict | None = None) -> None:
    """Start `isara run CFG` (one iteration) and SIGKILL it as soon as `accepted` samples are in `gen`."""
    cmd = [sys.executable, "-m", "loop.cli", "run", str(cfg), "--set", "iterations=1", "--plain"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 240
    while len(jsonl_rows(gen)) < accepted and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.pipeline
def test_a_run_killed_during_generation_resumes_to_the_target_without_duplicates(tiny_chat, tmp_path):
    # The tiny chat Llama writes a sample in a fraction of a second: 40 of them, so most are still to come.
    cfg = run_config(tmp_path, {**DATA_ONLY, **tiny_chat.settings, "generation.samples": 40, "generation.slots": 2},
                     seeds=tiny_seeds(8))
    run = tmp_path / "runs" / "garden"
    gen = run / "iter-01" / "generated.jsonl"
    _kill_once_accepted(cfg, gen, 2, tiny_chat.env)
    kept = [r["id"] for r in jsonl_rows(gen)]
    assert 2 <= len(kept) < 40
    server = first_of((e for e in jsonl_rows(run / "events.jsonl") if e["event"] == "server_started"),
                      "no server_started event")
    deadline = time.monotonic() + 10
    while pid_alive(server["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(server["pid"]), "llama-server outlived the killed run"
    status = run_isara("status", str(run), env={**tiny_chat.env, "COLUMNS": "200"})
    assert status.returncode == 0 and "interrupted" in status.stdout and f"isara run {run}" in status.stdout

    out = run_isara("run", str(cfg), "--set", "iterations=1", "--plain", env=tiny_chat.env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [r["id"] for r in jsonl_rows(gen)]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert ids[: len(kept)] == kept  # nothing accepted before the kill was lost or rewritten
    stats = json.loads((run / "iter-01" / "stats.json").read_text())
    assert stats["accepted"] == 40


@pytest.mark.pipeline
def test_demos_past_the_slots_context_are_dropped_least_relevant_first_and_the_run_still_generates(
        tiny_chat, tmp_path):
    # Seeds with long answers: four of them (retrieval.k) in one answer prompt exceed a 256-token slot, so llama-server
    # answers 400 (exceed_context_size_error). The run must send fewer demos, say so once, and still generate.
    seeds = "".join(json.dumps({**row, "response": " ".join([row["response"]] * 8)}) + "\n"
                    for row in map(json.loads, tiny_seeds(8).splitlines()))
    cfg = run_config(tmp_path, {**DATA_ONLY, **tiny_chat.settings, "iterations": 1, "generation.samples": 6,
                                "generation.ctx_per_slot": 256, "retrieval.k": 4}, seeds=seeds)
    out = run_isara("run", str(cfg), "--plain", env=tiny_chat.env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (out.stdout + out.stderr).count("exceeds the server slot's context") == 1
    rows = jsonl_rows(tmp_path / "runs" / "garden" / "iter-01" / "generated.jsonl")
    assert len(rows) == 6
    assert all(1 <= len(r["answer_demo_ids"]) < 4 for r in rows)  # fewer demos, never none
    assert all(len(r["question_demo_ids"]) == 4 for r in rows)  # questions alone fit: nothing dropped there
    assert all(r["tokens"]["answer_prompt"] < 256 for r in rows)


@pytest.mark.pipeline
def test_with_one_slot_a_killed_and_resumed_run_writes_the_same_samples_as_an_uninterrupted_one(
        finished_run, tmp_path):
    reference, _, _ = finished_run  # the same configuration, one slot, never interrupted
    cfg = _config(tmp_path)
    run = tmp_path / "runs" / "garden"
    gen = run / "iter-01" / "generated.jsonl"
    _kill_once_accepted(cfg, gen, 2)
    assert len(jsonl_rows(gen)) < 4, "the run finished before it could be killed"
    out = run_isara("run", str(cfg), "--set", "iterations=1", "--plain")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def content(path):  # everything but the wall-clock seconds of each attempt and the server's port
        return [{**{k: v for k, v in r.items() if k != "seconds"},
                 "generated_by": {stage: {k: v for k, v in by.items() if k != "endpoint"}
                                  for stage, by in r["generated_by"].items()}} for r in jsonl_rows(path)]

    for name in ("generated.jsonl", "rejected.jsonl"):
        assert content(run / "iter-01" / name) == content(reference / "iter-01" / name), name


@pytest.mark.parametrize("args, needles", [
    (["--set", "generation.temprature=0.5"], ["unknown config key 'generation.temprature'"]),
    (["--set", "generation.samples=0"], ["generation.samples", "greater than 0"]),
    (["--set", "iterations=many"], ["iterations"]),
    (["--name", "../escape"], ["'name'", "no '/'"]),
    (["--set", "data.seeds=missing.jsonl"], ["missing.jsonl", "does not exist", "data.seeds"]),
    (["--set", 'generation.workers=["http://127.0.0.1:8090"]'], ["generation.workers needs generation.workers_root"]),
    (["--set", 'generation.workers=["http://127.0.0.1:8090"]', "--set", 'generation.workers_root="."', "--set",
      'generation.endpoints=["http://127.0.0.1:8080"]'], ["generation.workers and generation.endpoints both set"]),
    (["--set", 'generation.workers=["http://127.0.0.1:8090"]', "--set", 'generation.workers_root="."', "--set",
      'export.mode="lora"'], ["workers serve whole GGUFs", 'export.mode = "merged"']),
])
def test_bad_configuration_is_a_one_line_error(args, needles, tmp_path, default_model):
    cfg = _config(tmp_path)
    assert_one_line_error(run_isara("run", str(cfg), *args, env={"COLUMNS": "400"}), *needles)
    assert not (tmp_path / "escape").exists()


def test_a_missing_config_file_is_a_one_line_error(tmp_path):
    out = run_isara("run", str(tmp_path / "nope.toml"), env={"COLUMNS": "300"})
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def trained_run(tiny_chat, tmp_path_factory):
    """A two-iteration training run, streamed as `--json` (a run that does work, not one skipped whole).

    The tiny chat Llama from an HF folder: the run exports the folder's GGUF to serve (once, into the store),
    then generates, trains and exports each iteration through every real part in seconds. No held-out seeds:
    the run's model is its latest iteration."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = run_config(tmp, {**tiny_chat.settings, "iterations": 2, "generation.samples": 4,
                           "generation.slots": 4, "train.epochs": 4}, seeds=tiny_seeds(8))
    out = run_isara("run", str(cfg), "--json", env=tiny_chat.env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "runs" / "garden", out


@pytest.mark.timeout(1800)
def test_a_training_run_generates_iteration_two_with_the_iteration_one_model(trained_run, tiny_chat):
    run, _ = trained_run
    state = json.loads((run / "state.json").read_text())
    assert [p for p in state["phases"] if p.startswith("iter-")] == [
        "iter-01/generate", "iter-01/train", "iter-01/export", "iter-02/generate", "iter-02/train", "iter-02/export"]
    for t in (1, 2):
        export = json.loads((run / f"iter-0{t}" / "export.json").read_text())
        assert export["serve_model"] == f"iter-0{t}/model.gguf" and export["verification"]["passed"]
        assert export["quant"] == "Q8_0" and export["samples"] == 8 + 4 * t
        assert (run / f"iter-0{t}" / "adapter" / "adapter_config.json").is_file()
    started = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"server_started"' in x]
    assert started[0]["model"].startswith(tiny_chat.env["ISARA_MODELS"])  # the folder's served export
    assert started[1]["model"] == str(run / "iter-01" / "model.gguf")
    stats2 = json.loads((run / "iter-02" / "stats.json").read_text())
    assert stats2["model"] == str(run / "iter-01" / "model.gguf")
    # Every sample names the model that wrote it, as its server answered: the base for iteration 1 (the
    # folder's name), iteration 1's model for iteration 2, in accepted and rejected samples alike.
    for t, name in ((1, "hf"), (2, "garden/iter-01")):
        rows = jsonl_rows(run / f"iter-0{t}" / "generated.jsonl") + jsonl_rows(run / f"iter-0{t}" / "rejected.jsonl")
        written = [by["model"] for r in rows for by in r["generated_by"].values()]
        assert len(written) >= 8 and set(written) == {name}, (t, written)
        stats = json.loads((run / f"iter-0{t}" / "stats.json").read_text())
        assert stats["served_as"] == name and list(stats["samples_by_model"]) == [name]
        assert stats["samples_by_model"][name] == {"accepted": 4, "rejected": stats["rejected"]}
    # Each iteration's LoRA moved: its B matrices start at zero (PEFT's init), where a run that trained nothing
    # (a learning rate of 0, no optimizer step) leaves them; and iteration 2's weights are not iteration 1's.
    import torch
    from safetensors.torch import load_file

    adapters = [load_file(run / f"iter-0{t}" / "adapter" / "adapter_model.safetensors") for t in (1, 2)]
    for t, weights in zip((1, 2), adapters):
        moved = {k: bool(w.abs().max() > 0) for k, w in weights.items() if "lora_B" in k}
        assert moved and all(moved.values()), (t, moved)
    assert adapters[0].keys() == adapters[1].keys()
    assert not all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    trained = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"train_finished"' in x]
    assert len(trained) == 2
    steps = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"train_step"' in x]
    for t in (1, 2):  # it learnt something: the last three steps' mean loss under the first three's
        losses = [s["loss"] for s in steps if s["iteration"] == t]
        assert len(losses) >= 6 and sum(losses[-3:]) < sum(losses[:3]), losses
        # ... and the same steps are in the iteration's train_log.csv (train.report_to's default)
        logged = (run / f"iter-0{t}" / "train_log.csv").read_text().splitlines()
        assert logged[0].startswith("step,steps,loss") and len(logged) == len(losses) + 1


@pytest.mark.timeout(1800)
def test_run_json_on_a_run_that_works_streams_every_event_it_records_and_ends_with_the_results(trained_run):
    run, out = trained_run
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # nothing but JSON on stdout, children's too
    kinds = {e["event"] for e in lines}
    assert lines[0]["event"] == "run_started" and lines[-2]["event"] == "run_finished" and "phase_skipped" not in kinds
    assert {"accepted", "train_step", "export_step", "server_started"} <= kinds, kinds  # every phase did work
    assert lines[:-1] == jsonl_rows(run / "events.jsonl")  # each event the run recorded, as it recorded it
    results = lines[-1]
    assert results["event"] == "results" and results["report"] == str(run / "report.md")
    assert [r["accepted"] for r in results["rows"] if r["kind"] == "iteration"] == [4, 4]


def _server_log_models(log: Path) -> list[str]:
    """The GGUF each llama-server start written to this log served (its `-m` argument), in order."""
    return re.findall(r" -m (\S+) ", log.read_text())


@pytest.mark.timeout(1800)
def test_chat_with_a_run_talks_to_its_latest_iteration(trained_run, tiny_chat):
    run, _ = trained_run
    chat = run_isara("chat", str(run), "-m", "red north?", "--max-tokens", "4", env=tiny_chat.env)
    assert chat.returncode == 0, chat.stdout[-2000:] + chat.stderr[-2000:]
    assert _server_log_models(run / "chat.server.log")[-1] == str(run / "iter-02" / "model.gguf")


@pytest.mark.timeout(1800)
def test_serve_a_run_serves_its_latest_iteration_or_the_one_iteration_names(trained_run, tiny_chat):
    import httpx
    import psutil

    run, _ = trained_run
    for args, t in (([], 2), (["--iteration", "1"], 1)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "serve", str(run), *args, "--port", str(port),
                                 "--slots", "1"], cwd=REPO, env={**os.environ, **tiny_chat.env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = proc.stdout.readline()  # printed once the server answers
            assert f"serving garden/iter-0{t} " in ready, ready + proc.stderr.read()
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30, trust_env=False).json()
            assert [m["id"] for m in models["data"]] == [f"garden/iter-0{t}"]
            served = [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True) if "llama" in c.name()]
            assert [str(run / f"iter-0{t}" / "model.gguf") in c for c in served] == [True], served
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, trust_env=False,
                           json={"model": f"garden/iter-0{t}", "prompt": "Question:", "max_tokens": 2})
            assert r.status_code == 200, r.text
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


TINY_CONVERSATION = [{"from": "system", "value": "north south"}, {"from": "human", "value": "red green?"},
                     {"from": "gpt", "value": "blue water stone cloud."}, {"from": "human", "value": "fire earth?"},
                     {"from": "gpt", "value": "seven nine open close light."}]


@pytest.fixture(scope="module")
def recipe_run(tiny_chat, tmp_path_factory):
    """One tiny-chat run for three behaviours: the paper's schedule (continue the last adapter on the seeds
    and the latest samples at half the rate), held-out seeds choosing the run's model, and held-out seeds
    scoring every model (eval.holdout). 14 seeds (one a ShareGPT conversation), 2 held out for scoring and
    4 to choose: 8 trained on, as in the other tiny runs."""
    tmp = tmp_path_factory.mktemp("recipe")
    cfg = run_config(tmp, {**tiny_chat.settings, "iterations": 2, "generation.samples": 4,
                           "generation.slots": 4, "train.epochs": 4, "train.from": "previous",
                           "train.samples": "latest", "train.lr_decay": 0.5, "data.validation": 4,
                           "eval.holdout": 0.1},
                     seeds=json.dumps({"conversations": TINY_CONVERSATION}) + "\n" + tiny_seeds(13))
    out = run_isara("run", str(cfg), "--plain", env=tiny_chat.env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "runs" / "garden", tmp


@pytest.mark.timeout(1800)
def test_the_papers_recipe_continues_the_last_adapter_on_the_seeds_and_the_latest_samples_at_half_the_rate(
        recipe_run):
    run, _ = recipe_run
    for t in (1, 2):  # seeds plus that iteration's samples, not the earlier ones
        assert json.loads((run / f"iter-0{t}" / "export.json").read_text())["samples"] == 8 + 4
    steps = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"train_step"' in x]
    first, second = ([s for s in steps if s["iteration"] == t] for t in (1, 2))
    assert len(first) == len(second)  # same sample count, same schedule: the rates differ by the decay alone
    assert all(b["lr"] == pytest.approx(a["lr"] / 2) for a, b in zip(first, second))
    # Iteration 2 starts from iteration 1's adapter, which has already learnt the seeds it sees again.
    assert second[0]["loss"] < first[0]["loss"], (first[0], second[0])


@pytest.mark.timeout(1800)
def test_a_run_with_held_out_seeds_scores_every_iteration_and_its_commands_take_the_best(recipe_run, tiny_chat):
    run, tmp = recipe_run
    held = {r["id"] for r in jsonl_rows(run / "validation.jsonl")}
    assert len(held) == 4 and not held & {r["id"] for r in jsonl_rows(run / "seeds.jsonl")}
    state = json.loads((run / "state.json").read_text())
    scores = {t: state["phases"][f"iter-0{t}/validate"]["stats"]["score"] for t in (1, 2)}
    for t in (1, 2):
        rows = jsonl_rows(run / f"iter-0{t}" / "validation.jsonl")
        assert {r["id"] for r in rows} == held and all(r["answer"] for r in rows)
    best = max(scores, key=lambda t: (scores[t], -t))  # the earlier on a tie
    assert "held-out seeds" in (run / "report.md").read_text()
    exported = run_isara("export", str(run), "--to", str(tmp / "out"), env=tiny_chat.env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"iteration {best}, the best on the held-out seeds" in " ".join(exported.stdout.split())
    assert (tmp / "out" / "model.gguf").read_bytes() == (run / f"iter-0{best}" / "model.gguf").read_bytes()


@pytest.mark.timeout(1800)
def test_every_model_of_the_run_is_scored_on_seeds_held_out_of_the_whole_run(recipe_run):
    run, _ = recipe_run
    held = jsonl_rows(run / "holdout.jsonl")
    ids = {r["id"] for r in held}
    assert len(held) == 2
    assert not ids & {r["id"] for f in ("seeds.jsonl", "validation.jsonl") for r in jsonl_rows(run / f)}
    assert not ids & {r["id"] for r in jsonl_rows(run / "index.items.jsonl")}  # never retrieved or shown
    folders = {"base": "baselines/base", "icl-knn": "baselines/icl-knn", "sft-seeds": "baselines/sft-seeds",
               "iter-01": "iter-01", "iter-02": "iter-02"}
    evals, tokens = {}, {}
    for name, folder in folders.items():
        evals[name] = h = json.loads((run / folder / "eval.json").read_text())["holdout"]
        answers = [a for a in jsonl_rows(run / folder / "answers.jsonl") if a["set"] == "holdout"]
        assert {(a["prompt"], a["reference"]) for a in answers} == {(r["prompt"], r["response"]) for r in held}
        assert h["n"] == 2 and h["loss"] > 0, name
        for key in ("rouge_l", "cosine"):  # eval.json's means are the rows' scores
            assert h[key] == pytest.approx(sum(a[key] for a in answers) / 2, abs=1e-4), (name, key)
        tokens[name] = sum(a["prompt_tokens"] for a in answers)
    assert tokens["icl-knn"] > tokens["base"]  # the nearest seed pairs were shown
    # The loss is each model's own: the demos, the baseline's training and each iteration's move it.
    assert len({h["loss"] for h in evals.values()}) == 5, evals
    report = (run / "report.md").read_text()
    assert "holdout: ROUGE-L / cosine / loss" in report
    h = evals["iter-02"]
    assert f"{h['rouge_l']:.2f} / {h['cosine']:.2f} / {h['loss']:.2f}" in report


@pytest.mark.timeout(1800)
def test_a_multi_turn_seed_keeps_every_turn_in_the_run(recipe_run):
    run, _ = recipe_run
    rows = [r for f in ("seeds.jsonl", "validation.jsonl", "holdout.jsonl") for r in jsonl_rows(run / f)]
    conversation = [r for r in rows if r.get("context")]
    assert len(conversation) == 1
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    whole = [{"role": roles[t["from"]], "content": t["value"]} for t in TINY_CONVERSATION]
    r = conversation[0]
    assert r["context"] + [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}] \
        == whole
    assert r in jsonl_rows(run / "seeds.jsonl")  # trained on (the unit tests show every turn carries the loss)
    assert json.loads((run / "state.json").read_text())["phases"]["seeds"]["stats"]["multi_turn"] == 1
    assert "1 seeds are conversations" in (run / "events.jsonl").read_text()


@pytest.mark.timeout(1800)
def test_iteration_picks_the_model_that_eval_chat_and_export_use(recipe_run, tiny_chat):
    run, tmp = recipe_run
    (tmp / "ask.jsonl").write_text(json.dumps({"prompt": "red north?"}) + "\n")
    (tmp / "pair.jsonl").write_text(json.dumps({"answer": "red north?", "refuse": "blue south?"}) + "\n")
    files = ["--refuse-prompts", str(tmp / "ask.jsonl"), "--answer-prompts", str(tmp / "ask.jsonl"),
             "--pair-prompts", str(tmp / "pair.jsonl")]  # all three: nothing of the safety domain is read
    for t in (1, 2):
        it = f"iter-0{t}"
        out = run_isara("eval", str(run), "--iteration", str(t), *files, "--max-tokens", "8",
                        "--out", str(tmp / f"eval-{t}"), env=tiny_chat.env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert json.loads((tmp / f"eval-{t}" / "eval.json").read_text())["label"] == f"garden/{it}"
        chat = run_isara("chat", str(run), "--iteration", str(t), "-m", "red north?", "--max-tokens", "4",
                         env=tiny_chat.env)
        assert chat.returncode == 0, chat.stderr[-2000:]
        assert f"-m {run / it / 'model.gguf'} " in (run / "chat.server.log").read_text()
        exported = run_isara("export", str(run), "--iteration", str(t), "--to", str(tmp / f"gguf-{t}"),
                             env=tiny_chat.env)
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert (tmp / f"gguf-{t}" / "model.gguf").read_bytes() == (run / it / "model.gguf").read_bytes()


def _load_every_form(folder: Path) -> dict[str, list[dict]]:
    """The exported data set as users load it: `datasets` for all four files, pyarrow for the Parquet too."""
    import pyarrow.parquet as pq
    from datasets import load_dataset

    forms = {name: list(load_dataset("json", data_files=str(folder / f"{name}.jsonl"), split="train"))
             for name in ("messages", "sharegpt", "alpaca")}
    forms["parquet"] = list(load_dataset("parquet", data_files=str(folder / "data.parquet"), split="train"))
    assert pq.read_table(folder / "data.parquet").to_pylist() == forms["parquet"]
    return forms


def _pairs_of(forms: dict[str, list[dict]]) -> dict[str, list[tuple[str, str]]]:
    """Each form's last question and answer per row (a conversation's earlier turns come before them)."""
    return {"messages": [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in forms["messages"]],
            "sharegpt": [(r["conversations"][-2]["value"], r["conversations"][-1]["value"]) for r in forms["sharegpt"]],
            "alpaca": [(r["instruction"], r["output"]) for r in forms["alpaca"]],
            "parquet": [(r["prompt"], r["response"]) for r in forms["parquet"]]}


@pytest.mark.timeout(1800)
def test_the_data_set_export_holds_exactly_what_the_model_trained_on_in_four_forms(recipe_run, tiny_chat):
    run, tmp = recipe_run  # train.samples = "latest": iteration 2 trained on the seeds and its own 4 samples
    out = run_isara("export", str(run), "--iteration", "2", "--format", "dataset", "--to", str(tmp / "data"),
                    env=tiny_chat.env)
    assert out.returncode == 0, out.stderr[-2000:]
    seeds, second = jsonl_rows(run / "seeds.jsonl"), jsonl_rows(run / "iter-02" / "generated.jsonl")
    want = [(r["prompt"], r["response"]) for r in seeds + second]
    forms = _load_every_form(tmp / "data")
    for name, pairs in _pairs_of(forms).items():
        assert pairs == want, name
    rows = forms["parquet"]
    assert [r["source"] for r in rows] == ["seed"] * 8 + ["generated"] * 4
    assert [r["iteration"] for r in rows] == [0] * 8 + [2] * 4
    assert {r["generated_by"] for r in rows[8:]} == {"iter-01/model.gguf"}  # iteration 2 generated with it. 1's
    held = {r["id"] for f in ("validation.jsonl", "holdout.jsonl") for r in jsonl_rows(run / f)}
    assert held and not held & {r["id"] for r in rows}  # held-out seeds never leave as training data
    # The conversation seed leaves whole in every form.
    i = first_of((k for k, r in enumerate(seeds) if r.get("context")), "no conversation among the seeds")
    assert forms["messages"][i]["messages"] == seeds[i]["context"] + [
        {"role": "user", "content": seeds[i]["prompt"]}, {"role": "assistant", "content": seeds[i]["response"]}]
    assert forms["sharegpt"][i]["system"] == "north south" and len(forms["sharegpt"][i]["conversations"]) == 4
    assert forms["alpaca"][i]["history"] == [["red green?", "blue water stone cloud."]]
    assert rows[i]["context"] == seeds[i]["context"]
    assert "1 seeds are conversations" in (tmp / "data" / "README.md").read_text()
    info = json.loads((tmp / "data" / "dataset_info.json").read_text())
    assert info["garden_sharegpt"]["file_name"] == "sharegpt.jsonl"
    card = (tmp / "data" / "README.md").read_text()
    assert "12 question/answer pairs: 8 seeds and 4 samples" in card and "4 more seeds were held out" in card
    assert "exactly what the model of iteration 2 trained on" in card
    assert hashlib.sha256((run / "config.toml").read_bytes()).hexdigest() in card


@pytest.mark.timeout(1800)
def test_the_data_set_export_of_every_sample_takes_each_iteration_up_to_the_one_named(recipe_run, tiny_chat):
    run, tmp = recipe_run
    out = run_isara("export", str(run), "--iteration", "2", "--format", "dataset", "--samples", "all",
                    "--to", str(tmp / "all"), env=tiny_chat.env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _load_every_form(tmp / "all")["parquet"]
    generated = [r for t in (1, 2) for r in jsonl_rows(run / f"iter-0{t}" / "generated.jsonl")]
    assert [r["id"] for r in rows] == [r["id"] for r in jsonl_rows(run / "seeds.jsonl") + generated]
    assert [r["iteration"] for r in rows[8:]] == [1] * 4 + [2] * 4


def test_a_data_only_run_exports_what_it_generated(finished_run, tmp_path):
    run, _, _ = finished_run  # training off: no model, but the data is the point of such a run
    out = run_isara("export", str(run), "--format", "dataset", "--to", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _load_every_form(tmp_path / "data")["parquet"]
    assert len(rows) == len(jsonl_rows(run / "seeds.jsonl")) + 8
    card = (tmp_path / "data" / "README.md").read_text()
    assert "| 1 | smollm2-135m | 4 |" in card and "| 2 | smollm2-135m | 4 |" in card
    assert "what iteration 2 trains on; the run did not train it" in card  # no model claims to be its product


def test_the_data_set_export_refuses_a_run_without_samples_and_a_full_folder(finished_run, tmp_path):
    run, _, _ = finished_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    out = run_isara("export", str(run), "--format", "dataset", "--to", str(tmp_path / "full"))
    assert_one_line_error(out, "not an empty folder")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    bare = tmp_path / "bare"  # the same run before its first generation finished
    bare.mkdir()
    for name in ("config.toml", "seeds.jsonl"):
        (bare / name).write_bytes((run / name).read_bytes())
    state = json.loads((run / "state.json").read_text())
    state["phases"] = {"seeds": state["phases"]["seeds"]}
    (bare / "state.json").write_text(json.dumps(state))
    out = run_isara("export", str(bare), "--format", "dataset", "--to", str(tmp_path / "out"))
    assert_one_line_error(out, "has no accepted samples yet")
    out = run_isara("export", str(run), "--samples", "all", "--to", str(tmp_path / "out"))
    assert_one_line_error(out, "--samples chooses the rows of --format dataset")
    assert not (tmp_path / "out").exists()


def _whole_frame(screen: str) -> bool:
    """Every panel opened also closed, down to the last one (events): a capture can land while the terminal is
    redrawn, and one cut after the header panel alone (seen in CI) looks closed too."""
    lines = [ln.strip() for ln in screen.splitlines() if ln.strip()]
    tops = sum(ln.startswith("╭") for ln in lines)
    return (bool(lines) and lines[-1].startswith("╰") and tops == sum(ln.startswith("╰") for ln in lines)
            and any(ln.startswith("╭") and " events " in ln for ln in lines))


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True).stdout


@pytest.mark.pipeline
@pytest.mark.skipif(subprocess.run(["which", "tmux"], capture_output=True).returncode != 0, reason="needs tmux")
def test_on_a_terminal_the_live_dashboard_shows_and_updates_the_run(tiny_chat, toolchain, tmp_path):
    # A whole training run of the tiny chat model: generation, training, export and evaluation panels.
    for name in ("refuse.jsonl", "answer.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{w} north?"}) + "\n" for w in ("red", "blue")))
    # 24 samples on 2 slots, captured every 0.1 s: generation lasts seconds, dozens of captures; with 4 on 4
    # slots every 0.25 s it took 0.7 s on an idle machine and no whole frame of it was captured (seen in CI).
    cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 24,
                                "generation.slots": 2, "train.epochs": 2, "eval.refuse_prompts": "refuse.jsonl",
                                "eval.answer_prompts": "answer.jsonl", "eval.baselines": False}, seeds=tiny_seeds(8))
    session = f"isara-test-{os.getpid()}"
    cmd = (f"cd {REPO} && env -u COLUMNS -u LINES ISARA_MODELS={tiny_chat.env['ISARA_MODELS']} {sys.executable} "
           f"-m loop.cli run {cfg}; sleep 60")
    _tmux("new-session", "-d", "-s", session, "-x", "80", "-y", "45", cmd)  # the narrowest common terminal
    events = tmp_path / "runs" / "garden" / "events.jsonl"
    try:
        screens, deadline, finished = [], time.monotonic() + 300, None
        while time.monotonic() < deadline:
            screens.append(_tmux("capture-pane", "-p", "-t", session))
            if finished is None and events.exists() and "run_finished" in events.read_text():
                finished = time.monotonic()
            # Once the run finished, until the dashboard has drawn its last frame (whole, nothing left to resume),
            # or 30 s: a condition with a deadline, not a fixed sleep.
            if finished is not None and ((_whole_frame(screens[-1]) and "resume: isara run" not in screens[-1])
                                         or time.monotonic() > finished + 30):
                break
            time.sleep(0.1)
    finally:
        _tmux("kill-session", "-t", session)
    # A capture can land while the terminal is being redrawn (seen in CI: a frame cut after the third panel's
    # title): judge whole frames only, every panel opened also closed.
    first = first_of((s for s in screens if "phase generate" in s and _whole_frame(s)), "\n----\n".join(screens))
    last = screens[-1]
    for field in ("isara run", "phase", "iteration 1/1", "elapsed", "RAM", "accepted", "rejected:",
                  "resume: isara run", "events"):
        assert field in first, field
    assert "accepted 24/24" in last and "accepted 24/24" not in first  # it updated as samples came in
    assert "question tokens/s: prompt" in last and "answer tokens/s: prompt" in last  # per stage, each whole
    assert "slots busy" in last
    assert "resume: isara run" not in last  # a finished run has nothing to resume
    training = first_of((s for s in screens if "phase train" in s and _whole_frame(s)), "\n----\n".join(screens))
    assert "step " in training and "loss " in training and "on 32 samples" in training
    steps = [e for e in jsonl_rows(events) if e["event"] == "train_step"]
    for phrase in (f"step {steps[-1]['step']}/{steps[-1]['steps']}", "verified", "harmful ", "over-refusal "):
        assert phrase in last, phrase  # training's last step, the export, the evaluation


def test_off_a_terminal_progress_is_plain_lines_without_control_codes(finished_run):
    _, _, out = finished_run  # run_isara pipes stdout: not a terminal
    assert "\x1b[" not in out.stdout and "\r" not in out.stdout
    assert "iter 1: accepted 1/4" in out.stdout


@pytest.mark.pipeline
@pytest.mark.skipif(subprocess.run(["which", "tmux"], capture_output=True).returncode != 0, reason="needs tmux")
def test_ctrl_c_on_the_dashboard_stops_cleanly_and_says_how_to_resume(default_model, toolchain, tmp_path):
    cfg = _config(tmp_path, **{"generation.samples": 40, "generation.slots": 2})
    run = tmp_path / "runs" / "garden"
    session = f"isara-ctrlc-{os.getpid()}"
    cmd = (f"cd {REPO} && env -u COLUMNS -u LINES {sys.executable} -m loop.cli run {cfg} --set iterations=1; "
           f"echo EXIT=$?; sleep 60")
    _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "45", cmd)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(jsonl_rows(run / "iter-01" / "generated.jsonl")) < 2:
            time.sleep(0.5)
        server_pid = first_of((e["pid"] for e in jsonl_rows(run / "events.jsonl") if e["event"] == "server_started"),
                              "no server_started event")
        _tmux("send-keys", "-t", session, "C-c")
        screen, deadline = "", time.monotonic() + 30
        while "EXIT=" not in screen and time.monotonic() < deadline:  # until the run has exited, or 30 s
            time.sleep(0.2)
            screen = _tmux("capture-pane", "-p", "-J", "-t", session)
    finally:
        _tmux("kill-session", "-t", session)
    assert "EXIT=130" in screen, screen
    assert f"Resume with: isara run {run}" in screen.replace("\n", "")
    assert not pid_alive(server_pid)  # the server went down with the run
    kept = jsonl_rows(run / "iter-01" / "generated.jsonl")
    assert len(kept) >= 2 and len({r["id"] for r in kept}) == len(kept)
    out = run_isara("status", str(run))
    assert "interrupted" in out.stdout


def test_a_run_that_stops_records_why_and_where_and_the_versions_that_ran_it(tmp_path):
    cfg = run_config(tmp_path, {"data.validation": 6}, seeds=8)  # more than half the seeds held out: refused
    out = run_isara("run", str(cfg))
    assert_one_line_error(out, "data.validation = 6")
    run = tmp_path / "runs" / "garden"
    stopped = json.loads((run / "state.json").read_text())["stopped"]
    assert (stopped["reason"], stopped["phase"]) == ("bad input", "setup") and "data.validation" in stopped["message"]
    status = run_isara("status", str(run), env={"COLUMNS": "200"})
    assert "stopped: bad input in setup" in status.stdout and f"isara run {run}" in status.stdout

    import torch
    import transformers

    run_isara("run", str(cfg))  # a second session: one entry each
    sessions = json.loads((run / "versions.json").read_text())["sessions"]
    assert len(sessions) == 2
    assert sessions[-1]["torch"] == torch.__version__ and sessions[-1]["transformers"] == transformers.__version__
    assert sessions[-1]["isara"] and sessions[-1]["llama.cpp (llama-cpp-python sdist)"]


def test_run_json_streams_only_json_lines_and_ends_with_the_results(finished_run):
    run, _, _ = finished_run
    out = run_isara("run", str(run), "--json")  # finished: every phase is skipped
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # nothing but JSON on stdout
    assert lines[0]["event"] == "run_started" and lines[-2]["event"] == "run_finished"
    assert {e["event"] for e in lines[1:-2]} == {"phase_skipped"}
    results = lines[-1]
    assert results["event"] == "results" and results["report"] == str(run / "report.md")
    assert [r["accepted"] for r in results["rows"]] == [4, 4]


@pytest.mark.pipeline
def test_run_quiet_on_a_run_that_works_prints_the_results_and_no_progress(tiny_chat, tmp_path):
    cfg = run_config(tmp_path, {**DATA_ONLY, **tiny_chat.settings, "iterations": 1}, seeds=tiny_seeds(8))
    out = run_isara("run", str(cfg), "--quiet", env={**tiny_chat.env, "COLUMNS": "100"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "garden"
    assert len(jsonl_rows(run / "iter-01" / "generated.jsonl")) == 4  # it generated (with progress to show)
    assert "isara: results" in out.stdout and f"report: {run / 'report.md'}" in out.stdout
    progress = [ln for ln in out.stdout.splitlines() if re.match(r"\[\s*\d+\.\ds\]", ln)
                or any(w in ln for w in ("accepted 1/4", "generating 4 samples", "run started:", "server started:",
                                              "index ready:"))]
    assert progress == [], progress


def test_run_quiet_prints_the_results_and_no_progress(finished_run):
    run, _, _ = finished_run
    out = run_isara("run", str(run), "--quiet", env={"COLUMNS": "100"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "isara: results" in out.stdout and f"report: {run / 'report.md'}" in out.stdout
    assert "phase_skipped" not in out.stdout and "run started" not in out.stdout


@pytest.mark.pipeline
def test_a_run_in_lora_mode_with_a_pool_recorded_verification_and_a_spent_attempt_budget(tiny_chat, tmp_path):
    # The configuration paths no other whole run takes, in one tiny run: export.mode = "lora" (served as the
    # base GGUF plus the adapter's), export.verify = "record", data.pool, an attempt budget that runs out,
    # and eval.n = 0 (every prompt of the sets).
    for name in ("refuse.jsonl", "answer.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{w} north?"}) + "\n"
                                             for w in ("red", "blue", "seven", "river", "stone")))
    (tmp_path / "pool.jsonl").write_text(tiny_seeds(6, seed=5))
    cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 12,
                                "generation.max_attempts_factor": 1.0, "filters.min_answer_chars": 45,
                                "generation.slots": 4, "train.epochs": 2, "export.mode": "lora",
                                "export.verify": "record", "data.pool": "pool.jsonl",
                                "eval.refuse_prompts": "refuse.jsonl", "eval.answer_prompts": "answer.jsonl",
                                "eval.n": 0, "eval.baselines": False}, seeds=tiny_seeds(8))
    out = run_isara("run", str(cfg), "--plain", env=tiny_chat.env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "garden"
    stats = json.loads((run / "iter-01" / "stats.json").read_text())
    assert stats["attempts"] == 12 and stats["accepted"] < 12  # the budget ran out before the target
    assert len(jsonl_rows(run / "iter-01" / "generated.jsonl")) == stats["accepted"]
    export = json.loads((run / "iter-01" / "export.json").read_text())
    assert export["mode"] == "lora" and export["serve_lora"] == ["iter-01/adapter.gguf"]
    assert not export["serve_model"].startswith("iter-01")  # the base model's GGUF
    assert export["verification"]["agreement"]  # recorded (strict would have stopped the run on a mismatch)
    pool = {r["id"] for r in jsonl_rows(run / "pool.jsonl")}
    assert len(pool) == 6 and pool <= {r["id"] for r in jsonl_rows(run / "index.items.jsonl")}
    answers = jsonl_rows(run / "iter-01" / "answers.jsonl")
    assert len(answers) == 10  # eval.n = 0: both sets whole
    evaluated = [e for e in jsonl_rows(run / "events.jsonl") if e["event"] == "server_started"][-1]
    assert evaluated["model"] == export["serve_model"]  # the base GGUF ...
    assert f"--lora {run / 'iter-01' / 'adapter.gguf'}" in (run / "server.log").read_text()  # ... plus the adapter
