"""LoRA training and the per-iteration export, on a tiny Llama and on the default model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY_LORA, build_tiny_llama, tiny_samples
from loop.config import ExportConfig, TrainConfig
from loop.data import Sample
from loop.models.convert import count_params, export_iteration, preflight
from loop.models.verify import served_answers
from loop.training.common import (COMPILE_MIN_WORK, IGNORE, answer_loss, autocast_bf16, collate, cpu_has_native_bf16,
                               encode_example, encode_examples, frozen_linears_to_bf16, use_compile)
from loop.training.peft import train_peft
from server.errors import BadInput

BF16_LOSS_TOLERANCE = 0.05  # nats; the default model's demo set measured 0.035 at most (BENCHMARKS.md)

@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama, tmp_path_factory):
    cfg = TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, **TINY_LORA)
    return train_peft(tiny_llama, tiny_samples(), cfg, tmp_path_factory.mktemp("tiny-train") / "adapter")


def test_the_loss_is_on_the_answer_and_its_end_of_turn_only(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = encode_example(tok, "red green", "blue water", 64)
    trained = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE])
    assert trained.replace(" ", "").startswith("bluewater") and "</s>" in trained
    assert "red" not in trained and "<|user|>" not in trained


CONTEXT = [{"role": "system", "content": "purple rules"}, {"role": "user", "content": "red green"},
           {"role": "assistant", "content": "blue water"}]


def test_every_assistant_turn_of_a_conversation_carries_the_loss_and_nothing_else(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = encode_example(tok, "yellow sun", "orange stone", 128, CONTEXT)
    trained = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE]).replace(" ", "")
    assert "bluewater" in trained and "orangestone" in trained and trained.count("</s>") == 2
    assert not any(word in trained for word in ("purple", "red", "yellow", "<|user|>", "<|system|>"))
    # Scoring a reference answer: only the last turn.
    last = encode_example(tok, "yellow sun", "orange stone", 128, CONTEXT, loss_on="last")
    scored = tok.decode([t for t, label in zip(last["input_ids"], last["labels"]) if label != IGNORE])
    assert "orange" in scored and "blue" not in scored and last["input_ids"] == ex["input_ids"]


def test_a_conversation_the_template_cannot_render_is_refused_naming_its_record(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                         "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    sample = Sample("s-1", "yellow sun", "orange stone", meta={"file": "seeds.jsonl", "line": 7}, context=CONTEXT)
    with pytest.raises(BadInput, match=r"^seeds.jsonl:7: the chat template can't render this conversation "
                                       r"\(System role not supported\)"):
        encode_examples(tok, [sample], 128)


def test_the_trained_adapter_lowers_the_loss_on_the_answers_it_trained_on(tiny_llama, tiny_adapter):
    from loop.evaluation.holdout import holdout_items, reference_loss

    items = holdout_items(tiny_samples())
    base, trained = reference_loss(tiny_llama, None, items), reference_loss(tiny_llama, tiny_adapter.adapter_dir, items)
    assert trained < 0.8 * base, (base, trained)


def test_the_earlier_turns_of_a_conversation_are_trained_on_too(tiny_llama, tmp_path):
    # The same last exchanges, with and without an earlier one: only the run that saw the earlier turns
    # learns its answer. A loader or encoder that kept the last exchange alone would train the two alike.
    from loop.evaluation.holdout import holdout_items, reference_loss

    pairs = tiny_samples(12)
    earlier = [{"role": "user", "content": "north south?"}, {"role": "assistant", "content": "seven nine seven nine."}]
    conversations = [Sample(s.id, s.prompt, s.response, context=earlier) for s in pairs]
    cfg = TrainConfig(epochs=3, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, **TINY_LORA)
    probe = holdout_items([Sample("p", "north south?", "seven nine seven nine.")])
    loss = {name: reference_loss(tiny_llama, train_peft(tiny_llama, samples, cfg, tmp_path / name).adapter_dir, probe)
            for name, samples in (("whole", conversations), ("last", pairs))}
    assert loss["whole"] < 0.8 * loss["last"], loss  # measured 3.52 vs 5.16


def test_lora_training_lowers_the_loss(tiny_adapter):
    losses = tiny_adapter.losses
    assert tiny_adapter.steps == len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert (tiny_adapter.adapter_dir / "adapter_model.safetensors").is_file()


def test_the_same_seed_trains_the_same_adapter(tiny_llama, tiny_adapter, tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, **TINY_LORA)
    again = train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "adapter")
    assert again.losses == tiny_adapter.losses


def test_bf16_autocast_follows_the_fp32_loss_curve(tiny_llama, tmp_path):
    # bf16 matmuls keep 8 bits of mantissa: the curve moves by rounding, never by more than a few hundredths.
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, precision=precision,
                          **TINY_LORA)
        runs[precision] = train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / precision)
    assert (runs["fp32"].precision, runs["bf16"].precision) == ("fp32", "bf16")
    drift = max(abs(a - b) for a, b in zip(runs["fp32"].losses, runs["bf16"].losses))
    assert 0 < drift < BF16_LOSS_TOLERANCE, (runs["fp32"].losses, runs["bf16"].losses)  # > 0: bf16 really ran
    assert runs["bf16"].losses[-1] < 0.8 * runs["bf16"].losses[0]


COMPILE_LOSS_TOLERANCE = 0.02  # nats; Inductor's fused kernels round in another order than eager's ops


def _adapter_keys(result) -> set[str]:
    from safetensors import safe_open

    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.slow  # compiles with Inductor (about 30 s the first time on a machine)
def test_compiled_decoder_layers_follow_the_eager_loss_curve_and_save_the_same_adapter(tiny_llama, tiny_adapter,
                                                                                         tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from server.toolchain import cache_root

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))  # the run's cache, unset after
    counters.clear()
    cfg = TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, compile="on", **TINY_LORA)
    compiled = train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "adapter")
    assert compiled.compiled and compiled.compile_error is None and not tiny_adapter.compiled
    # Dynamo captured the layers and the cross-entropy, each whole (a graph break would leave eager code between)
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"], dict(counters)
    drift = max(abs(a - b) for a, b in zip(compiled.losses, tiny_adapter.losses))
    assert len(compiled.losses) == len(tiny_adapter.losses) and drift < COMPILE_LOSS_TOLERANCE, \
        (compiled.losses, tiny_adapter.losses)
    assert _adapter_keys(compiled) == _adapter_keys(tiny_adapter)  # the merge and export read it as before


@pytest.mark.slow  # compiles with Inductor (about 30 s the first time on a machine)
def test_a_batch_of_one_compiles_no_second_graph_in_the_middle_of_the_training(tiny_llama, tmp_path):
    from torch._dynamo.utils import counters

    cfg = TrainConfig(epochs=1, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, compile="on", **TINY_LORA)
    graphs = {}
    for n in (8, 9):  # 9 examples in batches of 4: the epoch ends on a batch of one
        counters.clear()
        result = train_peft(tiny_llama, tiny_samples(n), cfg, tmp_path / str(n))
        graphs[n] = counters["stats"]["unique_graphs"]
        assert result.compiled and result.tokens == sum(len(e["input_ids"]) for e in _encoded(tiny_llama, n))
    # The 9 reuse what the 8 compiled: the one went with a label-less copy (else the layers and the loss would
    # each compile again for a size of 1: 2 graphs)
    assert graphs[9] == 0, graphs


def _encoded(hf, n):
    from transformers import AutoTokenizer

    return encode_examples(AutoTokenizer.from_pretrained(hf), tiny_samples(n), TrainConfig().max_length)


@pytest.mark.slow  # compiles with Inductor (about 30 s the first time on a machine)
def test_a_compile_that_fails_trains_eagerly_to_the_same_adapter_and_says_why(tiny_llama, tiny_adapter, tmp_path,
                                                                               monkeypatch):
    import torch._inductor.config

    torch._dynamo.reset()  # nothing compiled earlier in this process, nor cached on disk, to fall back on
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    cfg = TrainConfig(epochs=4, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, compile="on", **TINY_LORA)
    fell_back = train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "adapter")
    assert not fell_back.compiled and fell_back.compile_error, fell_back
    assert fell_back.losses == tiny_adapter.losses  # the failed first attempt left no gradient behind
    assert fell_back.summary()["compile_error"] == fell_back.compile_error


def test_auto_compile_takes_a_cpu_training_big_enough_to_pay_for_the_compile():
    demo = (135_000_000, 23_000)  # the default model on the demo's first training set
    assert use_compile("auto", "cpu", *demo)
    assert not use_compile("auto", "cpu", 2_000_000, 5_000)  # a tiny model: the compile would cost more than it saves
    assert not use_compile("auto", "cpu", 135_000_000, int(COMPILE_MIN_WORK / 135_000_000) - 1)
    assert not use_compile("auto", "cuda", *demo)
    assert use_compile("on", "cpu", 1, 1) and not use_compile("off", "cpu", *demo)


def _model_and_batch(hf, max_length: int = 64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, collate(encode_examples(tok, tiny_samples(6), max_length), pad)


def test_a_batch_is_padded_to_a_multiple_of_eight_tokens_that_change_no_loss(tiny_llama):
    import torch

    model, (ids, labels, mask) = _model_and_batch(tiny_llama, max_length=61)
    width = int(mask.sum(dim=1).max())
    assert width == 61 and ids.shape[1] == 64  # the longest sequence (cut at 61 tokens), rounded up to 8
    assert not mask[:, width:].any() and (labels[:, width:] == IGNORE).all()
    with torch.no_grad():
        padded = answer_loss(model, ids, labels, mask)
        unpadded = answer_loss(model, ids[:, :width], labels[:, :width], mask[:, :width])
    assert torch.allclose(padded, unpadded, atol=1e-5), (float(padded), float(unpadded))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: the family's final soft-capping must still apply
def test_the_head_runs_only_where_a_label_is_and_the_loss_is_the_models_own(arch, tmp_path):
    import torch

    model, (ids, labels, mask) = _model_and_batch(build_tiny_llama(tmp_path / arch, arch=arch, train_steps=0))
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[1]))
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours = answer_loss(model, ids, labels, mask)
    assert torch.allclose(ours, own, atol=1e-5), (float(ours), float(own))
    assert head_rows == [ids.shape[1], (labels[:, 1:] != IGNORE).any(0).sum()]  # the prompt's logits are skipped
    assert head_rows[1] < ids.shape[1]


def test_frozen_weights_held_in_bf16_change_no_number_under_bf16_autocast(tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model

    model, (ids, labels, mask) = _model_and_batch(tiny_llama)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    losses = []
    for cast in (False, True):
        if cast:
            assert frozen_linears_to_bf16(model) == 2 * model.config.num_hidden_layers + 1  # and the head
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(answer_loss(model, ids, labels, mask)))
    assert losses[0] == losses[1]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the LoRA stays fp32
    base = model.get_base_model()
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.get_input_embeddings().weight.dtype == torch.float32  # a tied head got a copy of its own


def test_auto_precision_takes_bf16_only_where_the_matmul_units_have_it():
    plain = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    assert not cpu_has_native_bf16(plain)
    assert cpu_has_native_bf16(plain.replace("avx512_vnni", "avx512_vnni avx512_bf16"))
    assert cpu_has_native_bf16(plain.replace("avx2", "avx2 amx_bf16 amx_tile"))
    assert autocast_bf16("bf16", "cpu") and not autocast_bf16("fp32", "cpu")
    assert autocast_bf16("auto", "cuda", cuda_bf16=True) and not autocast_bf16("auto", "cuda", cuda_bf16=False)


def test_all_linear_targets_every_projection_and_a_missing_name_is_refused(tiny_llama):
    from transformers import AutoModelForCausalLM

    from loop.training.common import lora_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert lora_targets(model, ["all-linear"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])  # the output head stays frozen
    assert lora_targets(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(BadInput, match="names qkv_proj, which this llama model does not have"):
        lora_targets(model, ["q_proj", "qkv_proj"])


class _Killed(Exception):
    pass


def test_a_training_killed_mid_epoch_goes_on_from_its_checkpoint_to_the_same_adapter(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    # 12 samples in batches of 2 for 2 epochs: 12 steps, a checkpoint every 4; the kill lands after step 6,
    # mid-way through the first epoch's second half, so the batches left of that pass must be restored too.
    cfg = TrainConfig(epochs=2, batch_size=2, learning_rate=5e-3, warmup_ratio=0.0, checkpoint_every=4,
                      **{**TINY_LORA, "dropout": 0.1})  # dropout: the torch RNG must be restored as well
    whole = train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "whole", checkpoint_dir=tmp_path / "ck-whole")
    assert not (tmp_path / "ck-whole").exists()  # removed once the adapter is saved

    def kill_after_six(step):
        if step["step"] == 6:
            raise _Killed()

    with pytest.raises(_Killed):
        train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "cut", on_step=kill_after_six,
                   checkpoint_dir=tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "progress.json").read_text())["step"] == 4
    resumed = train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "cut", checkpoint_dir=tmp_path / "ck")
    assert resumed.resumed_from_step == 4 and resumed.steps == whole.steps == 12
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-4)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "whole", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    other = cfg.model_copy(update={"learning_rate": 1e-3})  # other settings: the checkpoint is not theirs
    with pytest.raises(_Killed):
        train_peft(tiny_llama, tiny_samples(), cfg, tmp_path / "x", on_step=kill_after_six,
                   checkpoint_dir=tmp_path / "ck2")
    assert train_peft(tiny_llama, tiny_samples(), other, tmp_path / "x",
                      checkpoint_dir=tmp_path / "ck2").resumed_from_step is None


def test_merged_model_equals_base_plus_adapter(tiny_llama, tiny_adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 20, 35, 60, 80, 120, 7, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tiny_adapter.adapter_dir).eval()
    with torch.no_grad():
        unmerged = adapted(ids).logits
        merged = adapted.merge_and_unload()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-3)  # the adapter changed something


def test_exported_f16_gguf_answers_exactly_like_the_merged_hf_model(tiny_llama, tiny_adapter, tmp_path):
    exported = export_iteration(base_hf=tiny_llama, base_gguf=None, adapter_dir=tiny_adapter.adapter_dir,
                                out_dir=tmp_path / "iter", cfg=ExportConfig(quant="F16", verify="strict"),
                                params=count_params(tiny_llama))
    v = exported.info["verification"]
    assert v["passed"] and v["exact_required"] and v["agreement"] == [1.0, 1.0, 1.0], v
    assert "f16" not in v  # the served file is the F16 one: verified once
    assert exported.serve_model.name == "model.gguf" and not (tmp_path / "iter" / "model-f16.gguf").exists()
    assert set(exported.info["seconds"]) == {"load", "merge", "convert", "quantize", "verify"}


def test_a_quantized_export_verifies_its_f16_intermediate_strictly_and_records_its_own_agreement(
        tiny_llama, tiny_adapter, tmp_path):
    exported = export_iteration(base_hf=tiny_llama, base_gguf=None, adapter_dir=tiny_adapter.adapter_dir,
                                out_dir=tmp_path / "iter", cfg=ExportConfig(quant="Q8_0", verify="strict"),
                                params=count_params(tiny_llama))
    v = exported.info["verification"]
    assert v["passed"] and not v["exact_required"] and len(v["agreement"]) == 3, v
    # Recorded, not required (a fork of the quantized file is a measurement: next test), and recorded truly:
    # the served Q8_0 file's greedy tokens against the HF model's, counted again here without the export's
    # helpers: transformers' greedy search on base + adapter, llama-server's temperature-0 continuation of the
    # same prompt ids over plain HTTP, and the share of the HF answer (up to its EOS) they begin with alike.
    import httpx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.models.verify import VERIFY_PROMPTS
    from server.process import ManagedServer, ServerSettings

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                      tiny_adapter.adapter_dir).eval()
    again = []
    with ManagedServer(ServerSettings(model=tmp_path / "iter" / "model.gguf", slots=1, ctx_per_slot=1024)) as srv:
        for q in VERIFY_PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_dict=False)
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)[0, len(ids):]
            hf = hf.tolist()
            if tok.eos_token_id in hf:  # it stopped: the answer ends with its EOS
                hf = hf[:hf.index(tok.eos_token_id) + 1]
            r = httpx.post(f"{srv.base_url}/completion", timeout=120, trust_env=False,
                           json={"prompt": ids, "n_predict": 16, "temperature": 0, "return_tokens": True,
                                 "cache_prompt": False})
            got = r.json()["tokens"]
            same = 0
            while same < min(len(hf), len(got)) and hf[same] == got[same]:
                same += 1
            again.append(same / max(1, len(hf)))
    assert v["agreement"] == again, (v["agreement"], again)
    assert v["f16"]["passed"] and v["f16"]["exact_required"] and v["f16"]["agreement"] == [1.0, 1.0, 1.0], v
    assert exported.info["quant"] == "Q8_0" and not (tmp_path / "iter" / "model-f16.gguf").exists()
    assert list(exported.info["seconds"]) == ["load", "merge", "convert", "verify_f16", "quantize", "verify"]


def test_a_quantized_gguf_that_forks_from_the_hf_model_is_recorded_not_refused(tiny_llama, tiny_adapter, tmp_path):
    """Quantization moves log-probs by more than a near tie (0.66 nats measured on the default model at
    Q8_0), so a fork in the quantized file is a measurement; exactness is required of the F16 file."""
    from loop.models.verify import Reference, verify
    from transformers import AutoTokenizer

    from server.gguf import convert_hf_to_gguf, quantize

    f16 = convert_hf_to_gguf(tiny_llama, tmp_path / "base-f16.gguf")
    q8 = tmp_path / "base-q8.gguf"
    quantize(f16, q8, "Q8_0")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok.apply_chat_template([{"role": "user", "content": "red"}], add_generation_prompt=True, return_dict=False)
    fake = [Reference(ids, [5, 6, tok.eos_token_id], [{5: 0.95, 7: 0.05}, {6: 0.95, 8: 0.05},
                                                         {tok.eos_token_id: 0.95, 9: 0.05}])] * 3
    v = verify(q8, [], fake, tok, "Q8_0", "strict", 16, near_tie=0.3)
    assert v["passed"] and not v["exact_required"] and v["agreement"] == [0.0, 0.0, 0.0]
    assert [f["position"] for f in v["forks"]] == [0, 0, 0]


@pytest.mark.slow
def test_lora_mode_serves_the_same_tokens_as_merged_mode(tiny_llama, tiny_adapter, tmp_path, tiny_gguf_f16):
    from loop.models.convert import load_adapted
    from loop.models.verify import reference_tokens, verify

    merged = export_iteration(base_hf=tiny_llama, base_gguf=tiny_gguf_f16, adapter_dir=tiny_adapter.adapter_dir,
                              out_dir=tmp_path / "merged", cfg=ExportConfig(quant="F16"), params=1)
    lora = export_iteration(base_hf=tiny_llama, base_gguf=tiny_gguf_f16, adapter_dir=tiny_adapter.adapter_dir,
                            out_dir=tmp_path / "lora", cfg=ExportConfig(mode="lora"), params=1)
    assert lora.serve_model == tiny_gguf_f16 and lora.serve_lora[0].name == "adapter.gguf"
    model, tok = load_adapted(tiny_llama, tiny_adapter.adapter_dir)
    ref = reference_tokens(model, tok, 16)
    # Both answer like the HF model with the adapter, token for token but for near ties (the verification's
    # own rule: the base + LoRA sum is rounded in another order than the merged weights).
    for gguf, loras in ((merged.serve_model, []), (lora.serve_model, lora.serve_lora)):
        v = verify(gguf, loras, ref, tok, "F16", "strict", 16, near_tie=0.3)
        assert v["passed"] and all(f["near_tie"] for f in v["forks"]), v
    b = served_answers(lora.serve_model, lora.serve_lora, ref, tok, 16)["tokens"]
    # ... and the adapter is applied: the base GGUF alone answers otherwise.
    assert served_answers(tiny_gguf_f16, [], ref, tok, 16)["tokens"] != b


def _edited_copy(gguf: Path, out: Path, *args: str) -> Path:
    """A copy of `gguf` with metadata changed by gguf-py's own script, as a broken converter might leave it."""
    import subprocess
    import sys

    from server.toolchain import require_toolchain

    script = require_toolchain().convert_hf.parent / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    subprocess.run([sys.executable, str(script), str(gguf), str(out), *args, "--force"], check=True,
                   capture_output=True)
    return out


@pytest.mark.parametrize("edit, problem", [
    (("--special-token-by-id", "eos", "5"), "EOS id 5 in the GGUF, 2 in the tokenizer"),
    (("--chat-template", "{{ messages[0]['content'] }}"), "the chat template in the GGUF differs from the tokenizer's"),
])
def test_verification_names_an_eos_or_template_the_gguf_lost(edit, problem, tiny_llama, tiny_gguf_f16, tmp_path):
    """A GGUF that does not stop where the model stops, or formats chats otherwise, is the 'gibberish after
    export' bug: the verification names it (a real reference, a real GGUF with one thing edited)."""
    from loop.models.verify import ExportVerificationFailed, load_checkpoint, reference_tokens, verify

    model, tok = load_checkpoint(tiny_llama)
    reference = reference_tokens(model, tok, 16)
    assert verify(tiny_gguf_f16, [], reference, tok, "F16", "strict", 16, near_tie=0.3)["passed"]  # the unedited
    edited = _edited_copy(tiny_gguf_f16, tmp_path / "edited.gguf", *edit)
    with pytest.raises(ExportVerificationFailed, match=re.escape(problem)):
        verify(edited, [], reference, tok, "F16", "strict", 16, near_tie=0.3)


def test_preflight_refuses_an_architecture_the_converter_cannot_handle(tiny_llama, tmp_path, toolchain):
    from conftest import unsupported_copy

    odd = unsupported_copy(tiny_llama, tmp_path / "odd")
    with pytest.raises(BadInput, match="does not support the architecture NoSuchModelForCausalLM"):
        preflight(odd, tmp_path / "run", 1000)


def test_preflight_refuses_to_start_without_disk_space_for_the_export(tiny_llama, tmp_path, toolchain, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(BadInput, match="not enough disk space"):
        preflight(tiny_llama, tmp_path / "run", 135_000_000)


def test_the_export_progress_line_gives_the_f16_and_the_quantized_agreement():
    from loop.events import plain_line

    v = {"passed": True, "agreement": [1 / 3, 1.0, 1.0], "f16": {"agreement": [1.0, 1.0, 1.0]}}
    line = plain_line("export_finished", {"iteration": 1, "serve_model": "iter-01/model.gguf", "mode": "merged",
                                          "quant": "Q8_0", "verification": v})
    assert line == ("iter 1: exported iter-01/model.gguf (merged, Q8_0), verified "
                    "(greedy agreement: F16 100%, 100%, 100%; Q8_0 33%, 100%, 100%)")
    failed = plain_line("export_finished", {"iteration": 1, "serve_model": "m.gguf", "mode": "merged",
                                            "quant": "F16", "verification": {"passed": False, "agreement": [0.5]}})
    assert failed.endswith("verification FAILED (recorded) (greedy agreement: F16 50%)")


def test_the_training_progress_line_says_whether_the_layers_ran_compiled_or_why_not():
    from loop.events import plain_line

    done = {"iteration": 1, "steps": 36, "first_loss": 1.9, "last_loss": 1.5, "tokens_per_s": 543.5,
            "peak_rss_mb": 3079}
    assert plain_line("train_finished", {**done, "compiled": True}) == (
        "iter 1: trained 36 steps, loss 1.9 -> 1.5, 543.5 tokens/s, compiled, peak RSS 3079 MB")
    assert "tokens/s, peak RSS" in plain_line("train_finished", {**done, "compiled": False})
    failed = plain_line("train_finished", {**done, "compiled": False, "compile_error": "InductorError: no c++"})
    assert ", eager: the compile failed (InductorError: no c++), peak RSS" in failed


@pytest.mark.slow  # three trainings, each in a process of its own
def test_the_training_bench_runs_isara_trainer_and_trl_on_the_same_work_and_states_the_bound(tiny_llama, tmp_path):
    from loop.bench.training import ENGINES, bench_training

    cfg = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, **TINY_LORA)
    limits = {"matmul_gflop_s_f32": 100.0, "matmul_gflop_s_bf16": 400.0}
    out = bench_training(tiny_llama, tiny_samples(), cfg, tmp_path, limits=limits, log=lambda *_: None)
    rows = {r["engine"]: r for r in out["engines"]}
    assert tuple(rows) == ENGINES and not [r for r in rows.values() if "error" in r], rows
    # The same optimizer steps on the same examples: every engine sees the same trained tokens.
    assert len({(r["steps"], r["tokens"]) for r in rows.values()}) == 1, rows
    assert all(r["last_loss"] < r["first_loss"] and r["peak_rss_mb"] > 0 for r in rows.values()), rows
    # isara's own ratio to each other engine, and each engine's share of the machine's bound.
    assert rows["trl SFTTrainer"]["isara_ratio"] == round(rows["isara"]["tokens_per_s"]
                                                          / rows["trl SFTTrainer"]["tokens_per_s"], 2)
    assert out["bound_tok_s"] > 0 and all(0 < r["share_of_bound"] for r in rows.values())


def test_the_train_log_has_a_csv_row_per_step_and_keeps_only_the_rows_up_to_a_resumed_checkpoint(tmp_path):
    import csv

    from loop.training.log import TrainLog

    def steps(log, first, last):
        for k in range(first, last + 1):
            log.step({"step": k, "steps": 6, "loss": 3.0 - k / 10, "lr": 1e-4, "tokens": 100 * k, "seconds": k / 2,
                      **({"checkpoint": k} if k == 2 else {})})

    folder = tmp_path / "baselines" / "sft-seeds"  # not there yet when training starts
    steps(TrainLog(folder, ["csv"]), 1, 4)  # killed after step 4; its last checkpoint was at step 2
    steps(TrainLog(folder, ["csv"]), 3, 6)  # the resumed training goes on from step 3
    rows = list(csv.DictReader((folder / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[1]["checkpoint"] == "2" and float(rows[3]["loss"]) == 2.6 and float(rows[0]["tokens_per_s"]) == 200


def test_the_train_log_writes_tensorboard_scalars_tensorboard_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loop.training.log import TrainLog

    log = TrainLog(tmp_path, ["tensorboard"])
    for k in (1, 2, 3):
        log.step({"step": k, "steps": 3, "loss": 3.0 - k / 10, "lr": 1e-4, "tokens": 100 * k, "seconds": k})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [round(e.value, 4) for e in events.Scalars("train/loss")] == [2.9, 2.8, 2.7]
    assert [e.step for e in events.Scalars("train/tokens_per_s")] == [1, 2, 3]
    assert not (tmp_path / "train_log.csv").exists()  # not asked for
