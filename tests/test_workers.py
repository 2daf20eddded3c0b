"""A run scaled out on `isara worker`s: each iteration's model is loaded on every worker and writes the next
iteration's samples, evaluation runs there too, and a worker lost mid-generation costs no sample."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, assert_one_line_error, first_of, jsonl_rows, run_config, tiny_seeds
from loop.config import GenerationConfig
from loop.generation.workers import Workers, place, worker_model_name
from server.process import ManagedServer, ServerSettings
from server.router import Router


def start_worker(models_root, env, *args: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "worker", "--models-root", str(models_root),
                             "--port", str(port), "--slots", "2", "--threads", "1", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = proc.stdout.readline()
    assert "worker at" in ready, ready + proc.stderr.read()
    return proc, f"http://127.0.0.1:{port}"


def kill_host(proc: subprocess.Popen) -> None:
    """The worker's host is gone: the worker, its router and the servers of its models, at once."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)


def generating(run, t: int) -> bool:
    """Whether iteration t's generation has begun (read while the run appends its events)."""
    path = run / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return any('"event": "generation_started"' in ln and f'"iteration": {t},' in ln for ln in lines)


@pytest.mark.pipeline
@pytest.mark.timeout(1800)
def test_a_run_on_two_workers_generates_with_the_last_model_on_both_evaluates_there_and_outlives_one(
        tiny_chat, tmp_path):
    shared = tmp_path / "shared"  # storage both "hosts" see; here the same path on both sides
    shared.mkdir()
    env = {**os.environ, **tiny_chat.env}
    (a, url_a), (b, url_b) = start_worker(shared, env), start_worker(shared, env)
    try:
        for name in ("refuse.jsonl", "answer.jsonl"):
            (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{w} north?"}) + "\n"
                                                 for w in ("red", "blue", "seven")))
        cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 2, "generation.samples": 6,
                                    "generation.workers": [url_a, url_b], "generation.workers_root": str(shared),
                                    "generation.endpoint_slots": 2, "train.epochs": 2,
                                    "eval.refuse_prompts": "refuse.jsonl", "eval.answer_prompts": "answer.jsonl",
                                    "eval.baselines": False}, seeds=tiny_seeds(8))
        run = tmp_path / "runs" / "garden"
        log = tmp_path / "run.log"  # a file, not a pipe: nobody reads a pipe while the run writes
        proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "run", str(cfg), "--plain"], cwd=REPO, env=env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
        killed_at = None
        # The second worker's host goes down as iteration 2's generation begins: the run is held while it dies
        # (a tiny model's generation phase lasts under a second: no poll would land inside it otherwise).
        while proc.poll() is None:
            if killed_at is None and generating(run, 2):
                os.kill(proc.pid, signal.SIGSTOP)
                killed_at = time.time()
                kill_host(b)
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.02)
        out = log.read_text()
        assert proc.returncode == 0, out[-3000:]
        events = jsonl_rows(run / "events.jsonl")
        finished_2 = first_of((e for e in events if e["event"] == "generation_finished" and e["iteration"] == 2),
                              "no generation_finished event of iteration 2")
        assert killed_at is not None and finished_2["t"] > killed_at  # lost mid-generation
        assert finished_2["accepted"] == 6  # ... and the phase still met its target
        base = json.loads((run / "state.json").read_text())["phases"]["iter-01/generate"]["stats"]["model"]
        names = {label: worker_model_name(label, Path(gguf), run) for label, gguf in (
            ("hf", base), ("garden/iter-01", run / "iter-01" / "model.gguf"),
            ("garden/iter-02", run / "iter-02" / "model.gguf"))}
        for t, name in ((1, names["hf"]), (2, names["garden/iter-01"])):  # by the model of the iteration before
            rows = jsonl_rows(run / f"iter-0{t}" / "generated.jsonl") + jsonl_rows(run / f"iter-0{t}" / "rejected.jsonl")
            assert {by["model"] for r in rows for by in r["generated_by"].values()} == {name}, t
            stats = json.loads((run / f"iter-0{t}" / "stats.json").read_text())
            assert stats["served_as"] == name and stats["accepted"] == 6
        by_endpoint = json.loads((run / "iter-01" / "stats.json").read_text())["samples_by_endpoint"]
        assert set(by_endpoint) == {url_a, url_b}  # both workers wrote samples
        for t in (1, 2):  # evaluated on the workers (no server of the run's own ever started)
            assert json.loads((run / f"iter-0{t}" / "eval.json").read_text())["n_refuse"] == 3
        assert not [e for e in events if e["event"] == "server_started"]
        loads = [(e["name"], e["workers"]) for e in events if e["event"] == "workers_serving"]
        assert loads == [(names["hf"], [url_a, url_b]), (names["garden/iter-01"], [url_a, url_b]),
                         (names["garden/iter-02"], [url_a])]  # the lost worker left out
        assert names["garden/iter-01"].startswith("garden--iter-01--")
        assert f"workers serving {names['garden/iter-01']}: {url_a}, {url_b}" in out  # the progress says so
        with Router(url_a) as r:  # the run over, nothing of it stays loaded ...
            assert {s["value"] for s in r.models(rescan=False).values()} == {"unloaded"}
        assert list(shared.iterdir()) == []  # ... or in the shared folder (each model left it once unloaded)
        assert (run / "iter-02" / "model.gguf").is_file()  # the run's own files stay
    finally:
        for w in (a, b):
            if w.poll() is None:
                w.terminate()
                w.wait(30)


@pytest.mark.pipeline
def test_a_worker_that_does_not_see_the_runs_folder_fails_the_phase_naming_it_and_the_path(tiny_chat, tmp_path):
    elsewhere, shared = tmp_path / "elsewhere", tmp_path / "shared"
    elsewhere.mkdir(), shared.mkdir()
    env = {**os.environ, **tiny_chat.env}
    worker, url = start_worker(elsewhere, env)
    try:
        cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 2,
                                    "generation.workers": [url], "generation.workers_root": str(shared),
                                    "generation.workers_wait_s": 2, "train.enabled": False})
        out = subprocess.run([sys.executable, "-m", "loop.cli", "run", str(cfg), "--plain"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 2
        written = re.search(r"does not see (\S+), which", out.stderr)
        assert written and Path(written[1]).match(f"{shared}/hf--*/model.gguf"), out.stderr
        assert (f"isara: error: worker {url} does not see {written[1]}, which this run wrote for it: start the "
                "worker with --models-root set to that folder as its host sees it") in out.stderr
        assert list(shared.iterdir()) == []  # what it wrote there went with the phase that failed
    finally:
        worker.terminate()
        worker.wait(30)


@pytest.mark.pipeline
def test_a_run_sends_generation_api_key_to_a_worker_that_requires_one_and_is_refused_without_it(tiny_chat, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    env = {**os.environ, **tiny_chat.env}
    worker, url = start_worker(shared, env, "--api-key", "s3cret")
    try:
        runs = {}
        for name, key in (("keyless", {}), ("keyed", {"generation.api_key": "s3cret"})):
            cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 2,
                                        "generation.workers": [url], "generation.workers_root": str(shared),
                                        "generation.workers_wait_s": 2, "train.enabled": False, **key},
                             seeds=tiny_seeds(8), name=name)
            runs[name] = subprocess.run([sys.executable, "-m", "loop.cli", "run", str(cfg), "--plain"], cwd=REPO,
                                        env=env, capture_output=True, text=True, timeout=600)
        assert_one_line_error(runs["keyless"], f"router {url} refused the API key")
        assert not jsonl_rows(tmp_path / "runs" / "keyless" / "iter-01" / "generated.jsonl")
        assert runs["keyed"].returncode == 0, runs["keyed"].stdout[-2000:] + runs["keyed"].stderr[-2000:]
        stats = json.loads((tmp_path / "runs" / "keyed" / "iter-01" / "stats.json").read_text())
        assert stats["accepted"] == 2 and list(stats["samples_by_endpoint"]) == [url], stats
    finally:
        worker.terminate()
        worker.wait(30)


def test_a_model_is_placed_for_the_workers_once_as_a_link_under_a_name_no_other_file_has(tmp_path):
    gguf = tmp_path / "iter-01" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    run = tmp_path / "runs" / "garden"
    name = worker_model_name("garden/iter-01", gguf, run)
    assert name.startswith("garden--iter-01--") and "/" not in name
    target = tmp_path / "shared" / name / "model.gguf"
    assert place(gguf, target) and target.samefile(gguf)
    assert not place(gguf, target)
    assert target.samefile(gguf) and not list(target.parent.glob(".*"))  # kept; no temp left
    # the same label for another file (exported again after a crash, or another run's): another name
    again = tmp_path / "again" / "model.gguf"
    again.parent.mkdir()
    again.write_bytes(b"GGUF" + b"\0" * 60)
    assert worker_model_name("garden/iter-01", again, run) != name
    # the same file served by another run (two runs on one base model): another name, so neither removes the other's
    assert worker_model_name("garden/iter-01", gguf, tmp_path / "runs" / "other") != name


class Recorded:
    def __init__(self):
        self.events = []

    def emit(self, event, **fields):
        self.events.append((event, fields))


def router(shared: Path, slots: int = 1) -> ServerSettings:
    """A router (what `isara worker` runs) serving the models in `shared`, on one core."""
    return ServerSettings(model=None, models_dir=shared, slots=slots, ctx_per_slot=512, threads=1)


def workers_on(urls: list[str], shared: Path, run: Path, events=None, **settings) -> Workers:
    return Workers(GenerationConfig(workers=urls, workers_root=shared, workers_wait_s=60, **settings),
                   events or Recorded(), run)


def ask(workers: Workers, question: str = "Name a fruit."):
    """One completion through the workers' client, as generation sends it."""
    async def go():
        async with workers.client() as c:
            return await c.complete(f"Question: {question}\nAnswer:", max_tokens=4)
    return asyncio.run(go())


def test_a_worker_that_lost_the_model_loads_it_again_and_the_request_is_answered_by_it(default_model, toolchain,
                                                                                       tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    with ManagedServer(router(shared)) as srv:
        events = Recorded()
        workers = workers_on([srv.base_url], shared, tmp_path / "run", events)
        name = workers.serve(default_model.gguf, "smollm2-135m")
        with Router(srv.base_url) as r:
            r.unload(name)  # what a restarted worker serves: nothing
        out = ask(workers)
        assert out.model == name and out.attempts == 2
        assert ("worker_reloaded", {"url": srv.base_url, "name": name}) in events.events
        workers.release()
        with Router(srv.base_url) as r:
            assert r.models(rescan=False)[name]["value"] == "unloaded"
        assert list(shared.iterdir()) == [] and default_model.gguf.is_file()  # its link went; the file stays


def test_a_model_served_again_after_another_goes_back_into_the_shared_folder_and_answers(default_model, toolchain,
                                                                                         tmp_path):
    shared, run = tmp_path / "shared", tmp_path / "runs" / "garden"
    shared.mkdir()
    export = run / "baselines" / "sft-seeds" / "model.gguf"
    export.parent.mkdir(parents=True)
    os.link(default_model.gguf, export)  # another path: another model by name
    with ManagedServer(router(shared)) as srv:
        workers = workers_on([srv.base_url], shared, run)
        base = workers.serve(default_model.gguf, "smollm2-135m")  # the base model's baselines
        workers.serve(export, "garden/baselines/sft-seeds")  # the SFT baseline's: the base leaves the folder
        assert not (shared / base).exists()
        assert workers.serve(default_model.gguf, "smollm2-135m") == base  # iteration 1 generates with the base
        assert (shared / base / "model.gguf").samefile(default_model.gguf)
        assert ask(workers).model == base
        workers.release()
    assert list(shared.iterdir()) == []


def host_signal(pid: int, sig: int) -> None:
    """`sig` to a worker's whole host: the router and the servers of its models."""
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        p.send_signal(sig)


def test_a_worker_that_hangs_is_left_out_its_requests_answered_by_the_other_and_it_is_used_again_once_back(
        default_model, toolchain, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    with ManagedServer(router(shared, slots=2)) as a, ManagedServer(router(shared, slots=2)) as b:
        events = Recorded()
        # request_timeout_s far beyond the test: only the watch can free what the hung worker holds
        workers = workers_on([a.base_url, b.base_url], shared, tmp_path / "run", events, endpoint_slots=2,
                             health_interval_s=0.2, hang_timeout_s=5.0, request_timeout_s=600)
        name = workers.serve(default_model.gguf, "smollm2-135m")

        async def while_one_hangs() -> tuple[list, float]:
            async with workers.client() as c:
                host_signal(b.pid, signal.SIGSTOP)  # hangs: takes connections, answers nothing
                t0 = time.monotonic()
                out = await c.map(lambda i: c.complete(f"Question: Name fruit number {i}.\nAnswer:", max_tokens=4),
                                  range(6))
                elapsed = time.monotonic() - t0
                host_signal(b.pid, signal.SIGCONT)
                deadline = time.monotonic() + 30
                while not any(e == "worker_back" for e, _ in events.events) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert ("worker_back", {"url": b.base_url}) in events.events  # found answering again
                back = await c.map(lambda i: c.complete(f"Question: Name tree number {i}.\nAnswer:", max_tokens=4),
                                   range(4))
                return out + back, elapsed
        try:
            done, elapsed = asyncio.run(while_one_hangs())
        finally:
            host_signal(b.pid, signal.SIGCONT)
        first, then = done[:6], done[6:]
        assert all(d.model == name for d in done)
        assert {d.endpoint for d in first} == {a.base_url} and elapsed < 60  # not the request timeout
        assert any(d.attempts > 1 for d in first)  # some had gone to the hung worker and were sent again
        lost = [f for e, f in events.events if e == "worker_unavailable"]
        assert [f["url"] for f in lost] == [b.base_url] and "(hung)" in lost[0]["reason"]
        assert b.base_url in {d.endpoint for d in then}  # in use again
        workers.release()
