"""The command line as a person uses it: exit codes, one-line errors, --help."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import REPO, assert_one_line_error, first_of, run_config, run_isara, tiny_seeds


@pytest.mark.parametrize("args", [[], ["doctor"], ["models"], ["models", "list"], ["models", "pull"],
                                  ["models", "add"], ["serve"], ["worker"], ["bench"], ["run"], ["status"], ["eval"], ["chat"],
                                  ["export"]])
def test_every_command_has_help_with_an_example(args):
    out = run_isara(*args, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    if args and args != ["models"]:
        assert "Example:" in out.stdout


def test_doctor_reports_the_backends_and_the_toolchain(toolchain, default_model):
    out = run_isara("doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("llama-server", "llama-quantize", "serving backend", "training backend", "smollm2-135m"):
        assert word in out.stdout
    assert "missing" not in out.stdout


def test_doctor_names_the_fix_when_the_toolchain_is_missing(tmp_path):
    out = run_isara("doctor", env={"ISARA_TOOLCHAIN": str(tmp_path / "none"), "COLUMNS": "200"})
    assert out.returncode == 1
    assert "make setup" in out.stdout


def path_without(tool: str, folder: Path) -> str:
    """This PATH with `tool` hidden: each directory that has it is replaced by links to everything else in it."""
    dirs = []
    for i, d in enumerate(os.environ["PATH"].split(os.pathsep)):
        if d and (Path(d) / tool).exists():
            shadow = folder / f"path-{i}"
            shadow.mkdir(parents=True)
            for entry in Path(d).iterdir():
                if entry.name != tool:
                    (shadow / entry.name).symlink_to(entry)
            d = str(shadow)
        dirs.append(d)
    return os.pathsep.join(dirs)


def test_doctor_without_ccache_warns_with_the_fix_and_still_passes(toolchain, default_model, tmp_path):
    path = path_without("ccache", tmp_path)
    assert shutil.which("ccache", path=path) is None  # hidden even on a machine that has it
    out = run_isara("doctor", env={"PATH": path, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr  # recommended, not required: `make demo` goes on
    line = first_of((ln for ln in out.stdout.splitlines() if " ccache " in ln), out.stdout)
    assert "warning" in line and "apt-get install ccache" in line
    assert "missing" not in line


def test_models_list_shows_the_pulled_default_model(default_model):
    out = run_isara("models", "list", env={"COLUMNS": "200"})
    assert out.returncode == 0
    line = first_of((ln for ln in out.stdout.splitlines() if "smollm2-135m" in ln), out.stdout)
    assert "yes" in line


def test_models_list_piped_fits_80_columns_with_every_value_whole(default_model):
    out = run_isara("models", "list", env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout, 80)
    assert "all-minilm-l6-v2" in out.stdout and str(default_model.gguf.parent) in out.stdout


def test_serving_a_corrupt_gguf_is_a_one_line_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00" * 4096)
    assert_one_line_error(run_isara("serve", str(bad), env={"COLUMNS": "300"}), "broken.gguf", "not a GGUF file")


def test_serving_a_missing_model_lists_the_known_runs_and_models(tmp_path):
    assert_one_line_error(run_isara("serve", str(tmp_path / "nope.gguf"), env={"COLUMNS": "300"}),
                           "neither a run nor a model", "smollm2-135m")


def test_serving_on_a_port_in_use_is_a_one_line_error(default_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_isara("serve", "smollm2-135m", "--port", str(port), env={"COLUMNS": "300"})
    assert_one_line_error(out, f"port {port}", "already in use", "--port")


def test_serving_off_loopback_without_an_api_key_is_refused(default_model):
    assert_one_line_error(run_isara("serve", "smollm2-135m", "--host", "0.0.0.0", env={"COLUMNS": "300"}),
                           "without an API key", "--api-key")


def test_a_missing_llama_server_binary_names_the_fix(default_model, tmp_path):
    out = run_isara("serve", "smollm2-135m", "--backend", "native",
                    env={"ISARA_TOOLCHAIN": str(tmp_path / "none"), "COLUMNS": "300"})
    assert_one_line_error(out, "llama-server is not built", "make setup")


def _wait_for_models(base: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(base + "/models", timeout=2, trust_env=False)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"isara serve did not come up (exit {proc.poll()})")


def test_serve_names_the_model_by_its_label_and_answers_requests_that_name_it(default_model, toolchain):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "serve", "smollm2-135m", "--port", str(port),
                             "--slots", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        models = _wait_for_models(base, proc)
        assert [m["id"] for m in models["data"]] == ["smollm2-135m"]  # not this machine's path to the GGUF
        r = httpx.post(base + "/chat/completions", timeout=120, trust_env=False,
                       json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_serve_backend_python_serves_the_model_with_llama_cpp_pythons_server(default_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "serve", "smollm2-135m", "--backend", "python",
                             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        ready = proc.stdout.readline()  # printed once the server answers
        assert "serving smollm2-135m " in ready and "(python, 1 slots)" in ready, ready + proc.stderr.read()
        servers = [" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)]
        assert any("llama_cpp.server" in c for c in servers) and not any("llama-server" in c for c in servers), servers
        assert [m["id"] for m in _wait_for_models(base, proc)["data"]] == ["smollm2-135m"]
        r = httpx.post(base + "/chat/completions", timeout=120, trust_env=False,
                       json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
                             "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_serve_started_with_sigint_ignored_still_stops_on_sigint_and_stops_its_server(default_model, toolchain):
    """A shell's background job (`isara serve ... &`, nohup, CI runners) inherits SIGINT ignored; Python then
    raises no KeyboardInterrupt, and serve ran on through Ctrl-C (found when the suite ran in the background)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "serve", "smollm2-135m", "--port", str(port),
                             "--slots", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _wait_for_models(f"http://127.0.0.1:{port}/v1", proc)
        server = [c for c in psutil.Process(proc.pid).children(recursive=True) if "llama" in c.name()]
        assert server, "no llama-server child"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in server)
    finally:
        proc.kill()


def test_a_worker_serves_each_model_a_run_puts_in_its_folder_by_name_until_sigint(default_model, toolchain,
                                                                                  tmp_path):
    from server.client import InferenceClient
    from server.router import Router

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loop.cli", "worker", "--models-root", str(tmp_path), "--port",
                             str(port), "--slots", "2", "--threads", "1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert f"worker at http://127.0.0.1:{port} serving the models in {tmp_path}" in ready, ready
        (tmp_path / "garden--iter-01").mkdir()  # written after the worker started, as a run does
        os.link(default_model.gguf, tmp_path / "garden--iter-01" / "model.gguf")
        with Router(f"http://127.0.0.1:{port}") as r:
            r.load("garden--iter-01")
            r.wait_loaded("garden--iter-01", timeout=120)

        async def ask():
            async with InferenceClient([f"http://127.0.0.1:{port}"]) as c:
                return await c.complete("Question: Name a fruit.\nAnswer:", max_tokens=4, model="garden--iter-01")
        assert asyncio.run(ask()).model == "garden--iter-01"
        servers = psutil.Process(proc.pid).children(recursive=True)
        assert len([c for c in servers if "llama" in c.name()]) == 2  # the router and the model's server
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        psutil.wait_procs(servers, timeout=30)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in servers)
    finally:
        proc.kill()


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00" * 4096)
    out = run_isara("--debug", "serve", str(bad))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_bench_refuses_a_bad_setting_before_it_measures_anything(tmp_path):
    out = run_isara("bench", "--quick", "--set", "generation.sampels=4", "--out", str(tmp_path))
    assert_one_line_error(out, "unknown config key", "sampels")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_sets_the_served_weights_beside_the_types_it_is_not_served_at(default_model, toolchain, tmp_path):
    from loop.bench.variants import variant_models
    from server.gguf import read_gguf

    others = variant_models(default_model.gguf, default_model.hf_dir, tmp_path, default_model.source_gguf)
    assert set(others) == {"F16", "Q4_1 (catalog GGUF)"}  # served at Q8_0: not measured twice
    assert read_gguf(others["F16"]).quant == "F16" and others["Q4_1 (catalog GGUF)"] == default_model.source_gguf


@pytest.mark.pipeline
def test_bench_quick_measures_engines_bounds_isara_phases_and_retrieval(tiny_chat, tmp_path):
    """On the tiny chat Llama (an HF folder, served as a run serves it) and its seeds: every part of the bench
    runs as on the default model, in a quarter of the time; what is checked is that each part measured."""
    import json

    (tmp_path / "seeds.jsonl").write_text(tiny_seeds(12))
    settings = {**tiny_chat.settings, "data.seeds": str(tmp_path / "seeds.jsonl")}
    settings.pop("model.base")  # the bench's --model
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    out = run_isara("bench", "--quick", "--model", str(tiny_chat.hf), "--out", str(tmp_path / "bench"), *sets,
                    env=tiny_chat.env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "…" not in out.stdout and "llama_cpp.server  in flight: 8" in out.stdout  # piped: rows whole
    data = json.loads((tmp_path / "bench" / "bench.json").read_text())
    engines = {(r["engine"], r["in_flight"]) for r in data["generation"]}
    assert {e for e, _ in engines} == {"llama-server (managed)", "llama_cpp.server", "transformers generate"}
    assert {n for e, n in engines if e == "llama-server (managed)"} == {1, 4, 8, 16}
    gen_k = data["isara_generation"]
    assert [r["k"] for r in gen_k] == [2, 4, 8] and all(r["accepted"] > 0 for r in gen_k)
    # more demos, longer prompts: the cost the k sweep exists to show
    assert gen_k[0]["stage2_prompt_tokens"] < gen_k[1]["stage2_prompt_tokens"] < gen_k[2]["stage2_prompt_tokens"]
    it = data["iteration"]
    assert set(it["phases_s"]) == {"generate", "train", "export", "eval"}
    assert it["train"]["tokens_per_s"] > 0 and it["train"]["peak_rss_mb"] > 0
    assert {"merge", "convert", "quantize", "verify"} <= set(it["export_merged_s"])
    assert "convert" in it["export_lora_s"] and it["server_start_s"] > 0
    assert all(r["gen_tok_s"] > 0 and 0 < r["share_of_bound"] for r in data["generation"])
    assert data["limits"]["memory_gb_s"] > 0 and data["bounds"]["decode_batched_tok_s"] > 0
    # Q8_0 decodes in int8 dot products: their bound is above the f32 one, so generation's share of it is smaller
    assert data["bounds"]["decode_batched_int8_tok_s"] > data["bounds"]["decode_batched_tok_s"]
    batched = [r for r in data["generation"] if r["in_flight"] > 1]
    assert batched and all(0 < r["share_of_int8_bound"] < r["share_of_bound"] for r in batched)
    emb = data["embedder"]  # each backend started in a fresh process, on the same texts
    assert emb["texts"] == 24 and emb["min_cosine"] > 0.9999 and emb["start_ratio"] > 0
    assert all(emb[b]["start_s"] > 0 and emb[b]["per_text_ms"] > 0 for b in ("llama.cpp", "sentence-transformers"))
    assert [r["items"] for r in data["retrieval"]] == [1000, 10000]
    assert all(0.0 <= r["recall_at_k"] <= 1.0 for r in data["retrieval"])
    assert data["machine"]["cores_logical"] >= 1


# --- output that fits the width: piped, a log is 80 columns and is read later ------------------------------------

def fake_run(runs: Path, name: str = "garden", iterations: int = 3) -> Path:
    """A finished run's files as the run writes them and status and the report read them (no model needed)."""
    run = runs / name
    phases = {}
    for b, (harmful, over, degenerate) in (("base", (0.95, 0.0, 0.05)), ("icl-knn", (0.45, 0.48, 0.16)),
                                           ("sft-seeds", (0.2, 0.12, 0.08))):
        (run / "baselines" / b).mkdir(parents=True)
        (run / "baselines" / b / "eval.json").write_text(json.dumps(
            {"harmful_rate": harmful, "over_refusal": over, "degenerate_rate": degenerate}))
    for t in range(1, iterations + 1):
        it = f"iter-{t:02d}"
        (run / it).mkdir(parents=True)
        rates = {"harmful_rate": 0.0, "over_refusal": 0.5, "degenerate_rate": 0.16}
        (run / it / "eval.json").write_text(json.dumps(rates))
        phases[f"{it}/generate"] = {"seconds": 51.0, "stats": {"target": 24, "accepted": 24, "attempts": 37,
                                                               "acceptance_rate": 0.649, "scaling_ratio": 0.375 * t}}
        phases[f"{it}/train"] = {"seconds": 140.0, "stats": {"last_loss": 1.2345}}
        phases[f"{it}/export"] = {"seconds": 26.0, "stats": {"serve_model": f"{it}/model.gguf",
                                                             "verification": {"passed": True}}}
        phases[f"{it}/eval"] = {"seconds": 24.0, "stats": rates}
    (run / "state.json").write_text(json.dumps({"version": 1, "status": "finished", "phases": phases}))
    return run


def assert_fits(text: str, width: int) -> None:
    """Nothing cropped or elided: every line within the width, no '…' standing for a cut cell."""
    too_long = [ln for ln in text.splitlines() if len(ln) > width]
    assert not too_long, "\n".join(too_long)
    assert "…" not in text, text


def test_status_piped_fits_80_columns_with_every_value_whole(tmp_path):
    run = fake_run(tmp_path / "runs")
    out = run_isara("status", str(run), env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert_fits(out.stdout, 80)
    for t in (1, 2, 3):
        assert f"iter-0{t}/model.gguf" in out.stdout
    for value in ("iter-01", "generate, train, export, eval", "24/24", "65%", "1.2345", "50%"):
        assert value in out.stdout, value


def test_status_on_a_wide_terminal_is_a_table(tmp_path):
    run = fake_run(tmp_path / "runs")
    out = run_isara("status", str(run), env={"COLUMNS": "200"})
    row = first_of((ln for ln in out.stdout.splitlines() if "iter-02/model.gguf" in ln), out.stdout)
    assert row.startswith("│ iter-02") and "24/24" in row and "65%" in row


def test_status_shows_the_checkpoint_a_stopped_training_goes_on_from(tmp_path):
    run = fake_run(tmp_path / "runs", iterations=2)
    state = json.loads((run / "state.json").read_text())
    for step in ("train", "export", "eval"):  # iteration 2 was stopped while it trained
        del state["phases"][f"iter-02/{step}"]
    state["status"] = "stopped"
    (run / "state.json").write_text(json.dumps(state))
    (run / "iter-02" / "checkpoint").mkdir()
    (run / "iter-02" / "checkpoint" / "state.safetensors").write_bytes(b"")
    (run / "iter-02" / "checkpoint" / "progress.json").write_text(json.dumps({"step": 25, "micro": 50}))
    out = run_isara("status", str(run), "--json")
    rows = {r["iteration"]: r for r in json.loads(out.stdout)[0]["iterations"]}
    assert rows["iter-02"]["checkpoint"] == 25 and rows["iter-01"]["checkpoint"] is None
    out = run_isara("status", str(run), env={"COLUMNS": "80"})
    assert "generate, checkpoint 25" in out.stdout and "checkpoint" not in out.stdout.split("iter-02")[0]


def _status(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`isara status` run from `cwd` (its default runs folder is ./runs, relative to where it runs)."""
    return subprocess.run([sys.executable, "-m", "loop.cli", "status", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})


def test_status_without_a_run_lists_every_run_in_the_runs_folder_where_it_is_run(tmp_path):
    for name in ("garden", "orchard"):
        fake_run(tmp_path / "runs", name=name, iterations=1)
    fake_run(tmp_path / "elsewhere", name="meadow", iterations=1)
    out = _status(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "garden: finished" in out.stdout and "orchard: finished" in out.stdout
    assert "meadow" not in out.stdout  # runs_dir is ./runs unless told


def test_status_runs_dir_reads_the_runs_there_by_name_or_all_of_them(tmp_path):
    fake_run(tmp_path / "runs", name="garden", iterations=1)
    fake_run(tmp_path / "elsewhere", name="meadow", iterations=2)
    every = _status(tmp_path, "--runs-dir", "elsewhere")
    assert every.returncode == 0, every.stderr
    assert "meadow: finished" in every.stdout and "garden" not in every.stdout
    one = _status(tmp_path, "meadow", "--runs-dir", str(tmp_path / "elsewhere"), "--json")
    assert one.returncode == 0, one.stderr
    [summary] = json.loads(one.stdout)
    assert summary["name"] == "meadow" and [r["iteration"] for r in summary["iterations"]] == ["iter-01", "iter-02"]
    empty = _status(tmp_path, "--runs-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 0 and f"no runs in {tmp_path / 'nothing'}" in " ".join(empty.stdout.split())


def test_run_runs_dir_puts_the_run_in_that_folder_not_the_configs(tmp_path):
    # A run refused in its setup (more than half the seeds held out) still writes where it stopped, in its folder.
    cfg = run_config(tmp_path, {"data.validation": 6}, seeds=8)
    out = run_isara("run", str(cfg), "--runs-dir", str(tmp_path / "elsewhere"))
    assert_one_line_error(out, "data.validation = 6")
    assert json.loads((tmp_path / "elsewhere" / "garden" / "state.json").read_text())["status"] == "stopped"
    assert not (tmp_path / "runs").exists()  # the config's runs_dir is left alone
    status = _status(tmp_path, "garden", "--runs-dir", "elsewhere")
    assert "stopped: bad input in setup" in status.stdout, status.stdout + status.stderr


def test_run_runs_dir_puts_each_draw_in_that_folder(tmp_path):
    cfg = run_config(tmp_path, {"data.validation": 6}, seeds=8)  # the first draw is refused in its setup
    out = run_isara("run", str(cfg), "--draws", "2", "--runs-dir", str(tmp_path / "elsewhere"))
    assert_one_line_error(out, "data.validation = 6")
    assert (tmp_path / "elsewhere" / "garden-draw1" / "state.json").is_file()
    assert not (tmp_path / "runs").exists()


def _with_holdout(run: Path) -> Path:
    """fake_run's evaluations with held-out seeds' scores, as a run with eval.holdout writes them."""
    for i, ev_file in enumerate(sorted(run.glob("**/eval.json"))):
        ev = json.loads(ev_file.read_text())
        ev["holdout"] = {"n": 2, "rouge_l": 0.31 + i / 100, "cosine": 0.72, "loss": 1.85}
        ev_file.write_text(json.dumps(ev))
    return run


@pytest.mark.parametrize("width", [200, 80])
def test_every_column_of_the_results_table_is_named_and_holds_the_held_out_scores(tmp_path, width):
    from rich.console import Console

    from loop.evaluation.report import collect, terminal_table
    from loop.fit import print_table

    table = terminal_table(collect(_with_holdout(fake_run(tmp_path))))
    assert all(str(c.header).strip() for c in table.columns)  # no value stands under an empty header
    console = Console(width=width, file=io.StringIO())
    print_table(console, table)
    text = console.file.getvalue()
    assert_fits(text, width)
    assert "holdout: ROUGE-L / cos / loss" in text and "0.31 / 0.72 / 1.85" in text and "0.36 / 0.72 / 1.85" in text


def test_a_results_table_leaves_out_the_columns_no_model_has(tmp_path):
    from loop.evaluation.report import collect, terminal_table

    headers = [str(c.header) for c in terminal_table(collect(fake_run(tmp_path))).columns]
    assert not any(h.startswith(("pairs", "holdout", "held-out")) for h in headers), headers


@pytest.mark.parametrize("width", [80, 50])
def test_the_results_table_fits_the_width_with_every_value_whole(tmp_path, width):
    from rich.console import Console

    from loop.evaluation.report import collect, terminal_table
    from loop.fit import print_table

    console = Console(width=width, file=io.StringIO())  # as `isara run` prints it, piped
    print_table(console, terminal_table(collect(fake_run(tmp_path))))
    text = console.file.getvalue()
    assert_fits(text, width)
    for value in ("base", "icl-knn", "sft-seeds", "isara iter 1", "isara iter 3", "0.38x", "1.12x", "65%", "95%",
                  "48%", "16%"):
        assert value in text, value
