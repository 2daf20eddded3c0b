"""The memory preflight: a model too big for the machine is refused before any work, with the numbers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_config, run_isara
from loop.config import RunConfig
from loop.models.memory import GiB, check_fits, estimate, shape_of_gguf, shape_of_hf, vram_estimate
from loop.models.store import load_catalog, models_dir
from server.errors import BadInput


def seventy_billion(folder: Path) -> Path:
    """An HF folder with Llama 2 70B's config and a safetensors header for its 69 billion parameters (the
    header alone: the preflight reads no weights, so none are written)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000}))
    params = 68_976_648_192
    header = json.dumps({"model.weights": {"dtype": "BF16", "shape": [params], "data_offsets": [0, 2 * params]}})
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return folder


def test_a_run_on_a_model_too_big_for_the_machine_stops_before_any_work(tmp_path):
    big = seventy_billion(tmp_path / "llama-70b")
    config = run_config(tmp_path, {"iterations": 1}, name="big")
    out = run_isara("run", str(config), "--set", f'model.base="{big}"', env={"COLUMNS": "1000"})
    assert_one_line_error(out, f"{big} needs about", "GiB of memory to", "GiB free:", "choose a smaller model")
    assert not list((models_dir() / "local").glob("llama-70b-*"))  # no conversion was started


def test_models_add_refuses_a_model_too_big_to_convert(tmp_path):
    big = seventy_billion(tmp_path / "llama-70b")
    out = run_isara("models", "add", str(big), env={"ISARA_MODELS": str(tmp_path / "store"), "COLUMNS": "1000"})
    assert_one_line_error(out, "needs about", "GiB of memory to convert", "choose a smaller model")


def test_the_shape_is_read_from_headers_alike_for_the_hf_folder_and_the_gguf(default_model):
    hf, gguf = shape_of_hf(default_model.hf_dir), shape_of_gguf(default_model.gguf)
    params = load_catalog()["smollm2-135m"].params
    assert hf.params == gguf.params == params
    assert (hf.layers, hf.hidden, hf.heads, hf.kv_heads, hf.vocab) == (gguf.layers, gguf.hidden, gguf.heads,
                                                                      gguf.kv_heads, gguf.vocab) == (30, 576, 9, 3,
                                                                                                     49152)


def test_lora_mode_needs_less_memory_to_export_than_a_merge(default_model):
    shape = shape_of_hf(default_model.hf_dir)
    merged = estimate(shape, RunConfig(domain="safety"))
    lora = estimate(shape, RunConfig(domain="safety", export={"mode": "lora"}))
    assert lora["export"] < merged["export"] and lora["train"] == merged["train"]
    assert 1 * GiB < merged["train"] < 8 * GiB  # measured peak on the demo's data: 3.6 GB (BENCHMARKS.md)


def test_qlora_holds_the_frozen_base_in_a_quarter_of_the_gpu_memory(default_model):
    shape = shape_of_hf(default_model.hf_dir)
    bf16 = vram_estimate(shape, RunConfig(domain="safety"))["train"]
    qlora = vram_estimate(shape, RunConfig(domain="safety", train={"load_in_4bit": True}))["train"]
    assert bf16 - qlora == 2 * shape.params - shape.params // 2


def test_training_too_big_for_the_gpu_names_qlora_as_the_fix():
    with pytest.raises(BadInput) as e:
        check_fits("llama-70b", {"train": 150 * GiB}, 80 * GiB, gpu=True)
    assert str(e.value) == ("llama-70b needs about 150.0 GiB of GPU memory to train and the GPU has 80.0 GiB free: "
                            "set train.load_in_4bit = true (QLoRA), lower train.batch_size or train.max_length, or "
                            "choose a smaller model")


def test_qlora_without_a_cuda_gpu_is_refused_before_any_work(tmp_path):
    from loop.training.train import choose_backend

    if choose_backend("auto") == "unsloth":
        pytest.skip("this machine trains with Unsloth on CUDA, where QLoRA runs")
    config = run_config(tmp_path, {"iterations": 1, "train.load_in_4bit": True})
    out = run_isara("run", str(config), env={"COLUMNS": "1000"})
    assert_one_line_error(out, "train.load_in_4bit needs the Unsloth backend on a CUDA GPU (QLoRA)",
                          "set train.load_in_4bit = false")
    assert not (tmp_path / "runs" / "garden" / "iter-01").exists()
