"""GGUF conversion and quantization with the vendored llama.cpp tools, checked
against the HF model they came from."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from server.client import InferenceClient
from server.errors import BadInput, BadModelFile, ToolFailed
from server.gguf import QuantizeResult, quantize, read_gguf
from server.process import ManagedServer, ServerSettings

PROMPTS = ["red green blue", "river stone cloud light", "north south seven"]
N_TOKENS = 16


def hf_greedy_tokens(hf_dir: Path, prompt: str, n: int) -> tuple[list[int], list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return ids, out[0, len(ids):].tolist()


def served_greedy_tokens(gguf: Path, prompt_ids: list[int], n: int) -> list[int]:
    async def go():
        with ManagedServer(ServerSettings(model=gguf, slots=1, ctx_per_slot=256)) as srv:
            async with InferenceClient.for_servers([srv]) as c:
                out = await c.post("/completion", {"prompt": prompt_ids, "n_predict": n, "temperature": 0,
                                                   "return_tokens": True, "ignore_eos": True, "cache_prompt": False})
                return out["tokens"]
    return asyncio.run(go())


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_converted_tiny_llama_greedy_tokens_equal_the_hf_models(qtype, tiny_llama, tiny_gguf_f16, tmp_path):
    gguf = tiny_gguf_f16 if qtype == "F16" else quantize(tiny_gguf_f16, tmp_path / "tiny-q8_0.gguf", qtype).path
    for prompt in PROMPTS:
        ids, expected = hf_greedy_tokens(tiny_llama, prompt, N_TOKENS)
        assert served_greedy_tokens(gguf, ids, N_TOKENS) == expected, prompt


def test_converter_embeds_the_chat_template_and_eos(tiny_llama, tiny_gguf_f16):
    info = read_gguf(tiny_gguf_f16)
    config = json.loads((tiny_llama / "config.json").read_text())
    assert info.architecture == "llama"
    assert info.eos_token_id == config["eos_token_id"]
    assert info.chat_template and "<|user|>" in info.chat_template


def test_quantize_writes_the_requested_type_and_counts_k_quant_fallbacks(tiny_gguf_f16, tmp_path):
    q8 = quantize(tiny_gguf_f16, tmp_path / "q8.gguf", "Q8_0")
    assert read_gguf(q8.path).metadata["general.file_type"] == 7
    assert q8.fallback_tensors == 0
    # The tiny model's width (64) is not a multiple of 256: K-quants fall back.
    k = quantize(tiny_gguf_f16, tmp_path / "k.gguf", "Q4_K_M")
    assert isinstance(k, QuantizeResult) and k.fallback_tensors > 0
    assert read_gguf(k.path).size < read_gguf(tiny_gguf_f16).size


def test_quantize_rejects_an_unknown_type(tiny_gguf_f16, tmp_path):
    with pytest.raises(BadInput, match="unknown quantization 'Q3_XYZ'"):
        quantize(tiny_gguf_f16, tmp_path / "x.gguf", "Q3_XYZ")
    assert not (tmp_path / "x.gguf").exists()


def test_lora_adapter_converts_to_a_lora_gguf(tiny_llama, tmp_path, toolchain):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from server.gguf import convert_lora_to_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = convert_lora_to_gguf(tmp_path / "adapter", tiny_llama, tmp_path / "adapter.gguf")
    info = read_gguf(out)
    assert info.metadata["general.type"] == "adapter"
    assert info.metadata["adapter.type"] == "lora"


def test_read_gguf_rejects_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(BadModelFile, match="is not a GGUF file"):
        read_gguf(bad)


def test_read_gguf_rejects_a_truncated_file(tiny_gguf_f16, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf_f16.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadModelFile, match="is truncated"):
        read_gguf(cut)


def test_convert_refuses_a_folder_that_is_not_a_model(tmp_path, toolchain):
    from server.gguf import convert_hf_to_gguf

    with pytest.raises(BadInput, match="not a Hugging Face model folder"):
        convert_hf_to_gguf(tmp_path, tmp_path / "out.gguf")


def test_convert_failure_surfaces_the_converters_own_error(tiny_llama, tmp_path, toolchain):
    from conftest import unsupported_copy
    from server.gguf import convert_hf_to_gguf

    odd = unsupported_copy(tiny_llama, tmp_path / "odd")
    with pytest.raises(ToolFailed, match="NoSuchModelForCausalLM"):
        convert_hf_to_gguf(odd, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


@pytest.mark.parametrize("message", ["OSError: Not enough free space to write 335544320 bytes after offset 6526496",
                                     "llama_model_quantize: failed: write error: No space left on device"])
def test_a_tool_that_ran_out_of_disk_is_a_full_disk_not_a_tool_failure(message, tmp_path):
    """The converter or quantizer stopped by a full disk: the CLI's one-line disk message, not a tool's error."""
    import errno
    import sys

    from server.gguf import _run_tool

    out = tmp_path / "model.gguf"
    fail = [sys.executable, "-c", f"import sys; print({message!r}, file=sys.stderr); sys.exit(1)"]
    with pytest.raises(OSError) as e:
        _run_tool(fail, "convert_hf_to_gguf.py on x", tmp_path / "model.gguf.tmp", out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    other = [sys.executable, "-c", "import sys; print('ValueError: bad tensor', file=sys.stderr); sys.exit(1)"]
    with pytest.raises(ToolFailed, match="bad tensor"):
        _run_tool(other, "convert_hf_to_gguf.py on x", tmp_path / "model.gguf.tmp", out)
