"""Bring your own model, per architecture: tiny random models of each family both transformers and
llama.cpp's converter support, built here with a real tokenizer (SentencePiece trained here; Qwen's own
for the Qwens), go through what a
user's model goes through: the HF folder becomes a served GGUF (F16 verified strictly against the
folder, then quantized), that GGUF becomes a trainable HF checkpoint again (dequantized by
transformers, verified against llama-server on the same file), a LoRA trains on it, and the
iteration's export (merge, convert, verify) passes. Llama is covered by the rest of the suite.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY_LORA, assert_one_line_error, build_tiny_llama, run_isara, tiny_samples
from loop.config import ExportConfig, TrainConfig
from loop.models.convert import count_params, export_iteration
from loop.models.local import add_local
from loop.training.peft import train_peft

# Each with the tiny SentencePiece tokenizer trained here, but the Qwens: llama.cpp's converter knows a
# byte-level BPE vocabulary only by the hash of its tokens, so they get Qwen's own tokenizer (conftest).
ARCHITECTURES = ["gemma2", "mistral", "phi3", "qwen2", "qwen3"]
QWEN_VOCABULARY = {"qwen2", "qwen3"}
# llama.cpp writes a Mistral as a "llama" GGUF; transformers reads that back as a Llama: the same network.
DERIVED_AS = {"mistral": "llama"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_model_of_each_architecture_converts_both_ways_trains_and_exports_verified(arch, toolchain, tmp_path,
                                                                                      monkeypatch, request):
    tokenizer = request.getfixturevalue("qwen_tokenizer") if arch in QWEN_VOCABULARY else None
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    hf = build_tiny_llama(tmp_path / arch, arch=arch, tokenizer=tokenizer)
    assert json.loads((hf / "config.json").read_text())["model_type"] == arch

    served = add_local(hf, name=f"tiny-{arch}", log=lambda *_: None)  # HF folder -> GGUF to serve
    exported = json.loads((served.gguf.parent / "EXPORTED.json").read_text())
    assert exported["quant"] == "Q8_0" and exported["verification"]["passed"], exported

    derived = add_local(served.gguf, log=lambda *_: None)  # that GGUF -> an HF checkpoint to train
    record = json.loads((derived.hf_dir.parent / "DERIVED.json").read_text())
    assert record["verification"]["passed"], record
    assert json.loads((derived.hf_dir / "config.json").read_text())["model_type"] == DERIVED_AS.get(arch, arch)
    base = derived.hf_dir

    # The default targets: every linear layer, whatever the family names them (Phi-3 fuses q, k, v and gate, up).
    lora = {**TINY_LORA, "target_modules": TrainConfig().target_modules}
    cfg = TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, **lora)
    trained = train_peft(base, tiny_samples(), cfg, tmp_path / "adapter")
    per_epoch = len(trained.losses) // 4  # each step's batch differs: compare whole epochs
    assert sum(trained.losses[-per_epoch:]) < sum(trained.losses[:per_epoch]), trained.losses
    out = export_iteration(base_hf=base, base_gguf=served.gguf, adapter_dir=tmp_path / "adapter",
                           out_dir=tmp_path / "iter", cfg=ExportConfig(), params=count_params(base))
    assert out.serve_model.is_file() and out.info["verification"]["passed"], out.info["verification"]


@pytest.mark.slow
def test_a_tokenizer_the_converter_does_not_know_is_refused_in_one_line(default_model, toolchain, tmp_path):
    """A Qwen 2 with SmolLM2's vocabulary: transformers gives every qwen2 folder Qwen's pre-tokenizer, which
    splits text into token ids no model llama.cpp knows has, so its converter can't name the tokenizer."""
    hf = build_tiny_llama(tmp_path / "odd-qwen2", arch="qwen2", tokenizer=default_model.hf_dir, train_steps=0)
    out = run_isara("models", "add", str(hf), env={"ISARA_MODELS": str(tmp_path / "store"), "COLUMNS": "1000"})
    assert_one_line_error(out, f"{hf} has a tokenizer llama.cpp's converter does not know",
                          "give a GGUF of it")
