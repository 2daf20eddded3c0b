"""The consumer-GPU path end to end, where CUDA is present: what `make gpu-check` runs (`pytest -m gpu`).

On a machine with an NVIDIA GPU, after `make setup` (which builds llama.cpp's CUDA flavour there) and with the
[unsloth] extra installed (`make gpu-check` installs it):

- the llama.cpp toolchain is the CUDA build;
- a whole run (generate, train, export, verify, serve the next iteration) on the tiny chat Llama and on the
  default model, with Unsloth LoRA and with QLoRA (train.load_in_4bit), each iteration trained on the GPU;
- each run's model served by the CUDA llama-server with every layer on the GPU.

Every test here is marked `gpu`; elsewhere each skips with one line saying why. The timings (seconds per phase
of each run, the server's start) are printed at the end and written to $ISARA_GPU_CHECK_OUT when it is set;
`--durations` gives each test's own.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import run_config, run_isara, tiny_seeds

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1800)]

RUNS = [("tiny", "lora"), ("tiny", "qlora"), ("smollm2-135m", "lora"), ("smollm2-135m", "qlora")]
TIMINGS: dict[str, dict] = {}


def why_no_gpu() -> str | None:
    """None where CUDA training and serving can run; else the one-line reason."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return f"torch does not import ({e})"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'})")
    return None


@pytest.fixture(scope="session", autouse=True)
def cuda(request):
    """Skips every test here on a machine without CUDA, before any other fixture builds anything (session-wide,
    so it comes before the toolchain's); on one with it, prints and writes the timings the tests gathered."""
    why = why_no_gpu()
    if why:
        pytest.skip(why)
    yield
    lines = [f"{name}: " + ", ".join(f"{k} {v}" for k, v in t.items()) for name, t in TIMINGS.items()]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for line in ["gpu-check timings (seconds):", *lines]:
            reporter.write_line(line)
    if os.environ.get("ISARA_GPU_CHECK_OUT"):
        import torch

        out = Path(os.environ["ISARA_GPU_CHECK_OUT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                   "timings": TIMINGS}, indent=2) + "\n")


@pytest.fixture(scope="module")
def unsloth():
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("Unsloth is not installed: pip install -e '.[unsloth]' (make gpu-check installs it)")


def test_the_llama_cpp_toolchain_is_the_cuda_build(toolchain):
    assert toolchain.info["variant"] == "cuda", (
        f"{toolchain.root} is llama.cpp's {toolchain.info['variant']} build: on this machine `make setup` "
        "builds the CUDA flavour (server/toolchain.py: variant())")
    assert "-DGGML_CUDA=ON" in toolchain.info["cmake_flags"], toolchain.info


@pytest.fixture(scope="module", params=RUNS, ids=lambda p: "-".join(p))
def gpu_run(request, unsloth, toolchain, tmp_path_factory):
    """A whole two-iteration run trained by Unsloth on the GPU (LoRA, or QLoRA: the base in 4 bits)."""
    model, mode = request.param
    tmp = tmp_path_factory.mktemp(f"gpu-{model}-{mode}")
    settings = {"iterations": 2, "generation.samples": 4, "generation.slots": 4, "train.backend": "unsloth",
                "train.load_in_4bit": mode == "qlora", "train.epochs": 2, "eval.enabled": False}
    if model == "tiny":
        tiny = request.getfixturevalue("tiny_chat")
        cfg, env = run_config(tmp, {**tiny.settings, **settings}, seeds=tiny_seeds(8)), tiny.env
    else:
        request.getfixturevalue("default_model")
        cfg, env = run_config(tmp, {**settings, "generation.max_answer_tokens": 160}), {}
    started = time.perf_counter()
    out = run_isara("run", str(cfg), "--plain", env=env, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp / "runs" / "garden"
    phases = json.loads((run / "state.json").read_text())["phases"]
    TIMINGS[f"{model} {mode}"] = {"run": round(time.perf_counter() - started, 1),
                                  **{name: p.get("seconds") for name, p in phases.items() if name.startswith("iter-")}}
    return {"run": run, "phases": phases, "mode": mode, "name": f"{model} {mode}", "env": env}


def test_unsloth_trains_every_iteration_on_the_gpu(gpu_run):
    for t in (1, 2):
        train = gpu_run["phases"][f"iter-0{t}/train"]["stats"]
        assert train["backend"] == "unsloth" and train["steps"] > 0, train
        assert train["peak_vram_mb"] and train["peak_vram_mb"] > 0, train  # the GPU's memory, not the CPU's
        assert train["last_loss"] is not None and train["first_loss"] is not None, train
    config = (gpu_run["run"] / "config.toml").read_text()
    assert f"load_in_4bit = {'true' if gpu_run['mode'] == 'qlora' else 'false'}" in config


def test_every_iterations_model_is_exported_and_verified_against_the_merged_model(gpu_run):
    for t in (1, 2):
        export = json.loads((gpu_run["run"] / f"iter-0{t}" / "export.json").read_text())
        assert export["serve_model"] == f"iter-0{t}/model.gguf", export
        assert export["verification"]["passed"], export["verification"]


def test_iteration_two_generates_with_iteration_ones_model(gpu_run):
    run = gpu_run["run"]
    stats = json.loads((run / "iter-02" / "stats.json").read_text())
    assert stats["model"] == str(run / "iter-01" / "model.gguf") and stats["accepted"] == 4, stats


def test_the_cuda_llama_server_serves_the_runs_model_with_every_layer_on_the_gpu(gpu_run, tmp_path):
    import asyncio

    from server.client import InferenceClient
    from server.process import ManagedServer, ServerSettings

    log = tmp_path / "server.log"  # a log of its own stays after the server stops
    started = time.perf_counter()
    with ManagedServer(ServerSettings(model=gpu_run["run"] / "iter-02" / "model.gguf", slots=2,
                                      log_path=log)) as srv:
        up = round(time.perf_counter() - started, 2)

        async def ask():
            async with InferenceClient.for_servers([srv]) as c:
                return await c.chat([{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0.0)
        answer = asyncio.run(ask())
    TIMINGS[gpu_run["name"]]["server_start"] = up
    text = log.read_text(errors="replace")
    assert "CUDA" in text, text[-3000:]
    offloaded = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
    assert offloaded and offloaded[1] == offloaded[2], (offloaded and offloaded[0], text[-3000:])
    assert answer.finish_reason in ("stop", "length"), answer
