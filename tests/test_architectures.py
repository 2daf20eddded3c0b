"""Bring your own model, per architecture: tiny random models of each family both transformers and
llama.cpp's converter support, built here with a real (SentencePiece) tokenizer, go through what a
user's model goes through: the HF folder becomes a served GGUF (F16 verified strictly against the
folder, then quantized), that GGUF becomes a trainable HF checkpoint again (dequantized by
transformers, verified against llama-server on the same file), a LoRA trains on it, and the
iteration's export (merge, convert, verify) passes. Llama is covered by the rest of the suite.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY_LORA, build_tiny_llama, tiny_samples
from loop.config import ExportConfig, TrainConfig
from loop.export import count_params, export_iteration
from loop.models import add_local
from loop.train_peft import train_peft
from server.errors import BadInput

# GGUFs transformers loads into a checkpoint that does not answer like llama-server on the same file: refused.
# Gemma 2: transformers rebuilds its SentencePiece tokenizer from the GGUF so that it splits text unlike
# llama.cpp (measured on the tiny tokenizer here, which like Gemma's own adds no space prefix).
GGUF_DERIVATION_REFUSED = {"gemma2": "tokenizes the prompts differently from the HF tokenizer"}

# Tested so far with the tiny SentencePiece tokenizer. Qwen 2/3 and Phi-3 need their own families'
# tokenizers to convert (Qwen: byte-level BPE; with this one the F16 GGUF tokenizes unlike the folder, and the
# export verification says so; Phi-3: llama.cpp's vocabulary loader wants its special tokens): the next step.
ARCHITECTURES = ["gemma2", "mistral"]
# llama.cpp writes a Mistral as a "llama" GGUF; transformers reads that back as a Llama: the same network.
DERIVED_AS = {"mistral": "llama"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_model_of_each_architecture_converts_both_ways_trains_and_exports_verified(arch, toolchain, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    hf = build_tiny_llama(tmp_path / arch, arch=arch)
    assert json.loads((hf / "config.json").read_text())["model_type"] == arch

    served = add_local(hf, name=f"tiny-{arch}", log=lambda *_: None)  # HF folder -> GGUF to serve
    exported = json.loads((served.gguf.parent / "EXPORTED.json").read_text())
    assert exported["quant"] == "Q8_0" and exported["verification"]["passed"], exported

    if arch in GGUF_DERIVATION_REFUSED:  # the verification catches it, and the user is told why
        with pytest.raises(BadInput, match=GGUF_DERIVATION_REFUSED[arch]):
            add_local(served.gguf, log=lambda *_: None)
        base = hf  # the user's HF folder trains as it is
    else:
        derived = add_local(served.gguf, log=lambda *_: None)  # that GGUF -> an HF checkpoint to train
        record = json.loads((derived.hf_dir.parent / "DERIVED.json").read_text())
        assert record["verification"]["passed"], record
        assert json.loads((derived.hf_dir / "config.json").read_text())["model_type"] == DERIVED_AS.get(arch, arch)
        base = derived.hf_dir

    # The default targets: every linear layer, whatever the family names them (Phi-3 fuses q, k, v and gate, up).
    lora = {**TINY_LORA, "target_modules": TrainConfig().target_modules}
    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, **lora)
    trained = train_peft(base, tiny_samples(), cfg, tmp_path / "adapter")
    assert trained.losses[-1] < trained.losses[0]
    out = export_iteration(base_hf=base, base_gguf=served.gguf, adapter_dir=tmp_path / "adapter",
                           out_dir=tmp_path / "iter", cfg=ExportConfig(), params=count_params(base))
    assert out.serve_model.is_file() and out.info["verification"]["passed"], out.info["verification"]
