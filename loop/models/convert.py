"""Export an iteration's model to GGUF and verify it before anything serves it.

merged (default): merge the LoRA into the base, save safetensors, convert to
GGUF f16 with llama.cpp's converter, quantize (`export.quant`), verify.
lora: convert the adapter to a LoRA GGUF and serve it on the base GGUF with
`--lora` (faster export, the same outputs).

Verification exists because the most common complaint about exported
fine-tunes is gibberish: a lost chat template or EOS, a broken conversion. The
GGUF must carry the tokenizer's chat template and EOS, llama-server must render
and tokenize the prompts as the HF tokenizer does, and the F16 GGUF's greedy
answers to three fixed chat prompts must equal the merged HF model's (first
`export.verify_tokens` tokens). One exception, recorded as such: greedy
decoding forks at a token where the HF model itself hesitated (the GGUF picked
a token within `export.near_tie` of the HF model's choice, in log-probability):
that is rounding, not a broken export. Exactness is checked at F16 because
that is where it holds: on the default 135M model the F16 GGUF's log-probs sit
within 0.05 nats of the HF model's, Q8_0's move by up to 0.66, enough to flip
a near tie either way. So a quantized export is verified in two steps: its F16
intermediate strictly, before quantizing; the quantized file for template, EOS
and tokenization, with its greedy agreement recorded.

The same check runs in reverse for a user's GGUF (`verify_derived`): the HF
checkpoint transformers derives from it, to train on, must answer like
llama-server on that GGUF, compared by teacher-forced log-probabilities.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from server.client import InferenceClient
from server.errors import BadInput, ToolFailed
from server.gguf import QUANT_TYPES, convert_hf_to_gguf, convert_lora_to_gguf, quantize, read_gguf
from server.process import ManagedServer, ServerSettings
from server.toolchain import require_toolchain

from loop.config import ExportConfig
from loop.files import atomic_dir
from loop.training.common import copy_tokenizer_files

VERIFY_PROMPTS = ["What is the capital of France?", "Name three colors.", "Write one sentence about the sea."]
EXACT_QUANTS = ("F16", "BF16", "F32")  # greedy agreement is required at these


class ExportVerificationFailed(ToolFailed):
    """The exported GGUF does not answer like the model it came from."""


@dataclass
class Exported:
    serve_model: Path  # the GGUF to serve
    serve_lora: list[Path]  # LoRA GGUFs to load with it (lora mode)
    info: dict

    def to_json(self) -> dict:
        return {"serve_model": str(self.serve_model), "serve_lora": [str(p) for p in self.serve_lora], **self.info}


def resolve_quant(requested: str, params: int) -> str:
    q = requested.upper()
    if q == "AUTO":
        return "Q8_0" if params < 1_000_000_000 else "Q4_K_M"
    if q not in QUANT_TYPES:
        raise BadInput(f"export.quant = {requested!r} is not known: use auto or one of {', '.join(QUANT_TYPES)}")
    return q


def preflight(hf_dir: Path, out_dir: Path, params: int) -> None:
    """Before training: can this architecture be converted, and is there room for the export?"""
    tc = require_toolchain()
    config = json.loads((hf_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    sources = [tc.convert_hf] + sorted((tc.convert_hf.parent / "conversion").glob("*.py"))
    if not any(f'"{arch}"' in p.read_text(encoding="utf-8", errors="replace") for p in sources):
        raise BadInput(f"llama.cpp's converter does not support the architecture {arch} of {hf_dir}: "
                       "choose a model whose architecture llama.cpp supports (e.g. Llama, Qwen2, Mistral)")
    # merged fp32 safetensors + f16 GGUF + the quantized GGUF (at most 8 bits), with 20% to spare
    need = int(params * (4 + 2 + 1) * 1.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise BadInput(f"not enough disk space in {out_dir} for the export: {free / 2**30:.1f} GiB free, "
                       f"about {need / 2**30:.1f} GiB needed; free some space or move runs_dir")


def count_params(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def _load_checkpoint(hf_dir: Path):
    """An HF checkpoint in float32, from safetensors only, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    return model.eval(), tok


def _load_adapted(base_hf: Path, adapter_dir: Path):
    from peft import PeftModel

    base, tok = _load_checkpoint(base_hf)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), tok


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]  # greedy continuation, ending with EOS when the model stopped
    top: list[dict[int, float]]  # the five most likely tokens at each step, with their probabilities


def reference_tokens(model, tokenizer, n: int) -> list[Reference]:
    """Greedy continuations of the HF model for the verification prompts, with their margins."""
    import torch

    out = []
    eos = tokenizer.eos_token_id
    for q in VERIFY_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_dict=False)
        with torch.no_grad():
            res = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=eos, output_scores=True,
                                 return_dict_in_generate=True)
        gen = res.sequences[0, len(ids):].tolist()
        if eos in gen:
            gen = gen[:gen.index(eos) + 1]
        top5 = [torch.softmax(s[0].float(), -1).topk(5) for s in res.scores[:len(gen)]]
        out.append(Reference(ids, gen, [{int(i): float(p) for i, p in zip(t.indices, t.values)} for t in top5]))
    return out


def served_answers(gguf: Path, lora: list[Path], reference: list[Reference], tokenizer, n: int,
                   logprobs: bool = False) -> dict:
    """What the server makes of the verification prompts: its template rendering, its tokenization of
    the rendered text, and its greedy continuation of the HF prompt ids. With `logprobs`, also its top
    log-probabilities after every prefix of the HF continuation (teacher-forced: both models then predict
    from the same tokens, so their numbers compare at every position, not only up to a greedy fork)."""
    messages = [[{"role": "user", "content": q}] for q in VERIFY_PROMPTS]
    rendered = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]

    async def go():
        with ManagedServer(ServerSettings(model=gguf, lora=lora, slots=1, ctx_per_slot=1024)) as srv:
            async with InferenceClient.for_servers([srv]) as c:
                out = {"rendered": [], "tokenized": [], "tokens": [], "logprobs": []}
                for m, text, ref in zip(messages, rendered, reference):
                    out["rendered"].append((await c.post("/apply-template", {"messages": m}))["prompt"])
                    out["tokenized"].append((await c.post("/tokenize", {"content": text, "add_special": False,
                                                                      "parse_special": True}))["tokens"])
                    r = await c.post("/completion", {"prompt": ref.prompt, "n_predict": n, "temperature": 0,
                                                     "return_tokens": True, "cache_prompt": False})
                    out["tokens"].append(r["tokens"])
                    if logprobs:
                        out["logprobs"].append([await _next_logprobs(c, ref.prompt + ref.tokens[:i])
                                                for i in range(len(ref.tokens))])
                return out
    return {**asyncio.run(go()), "expected_rendered": rendered}


SERVED_TOP = 10  # log-probs asked of the server per position: wider than the HF side's five, so its choice is in it


async def _next_logprobs(client, ids: list[int]) -> dict[int, float]:
    """The server's most likely next tokens after `ids`, with their log-probabilities (before sampling)."""
    r = await client.post("/completion", {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": SERVED_TOP,
                                          "cache_prompt": True})
    return {int(t["id"]): float(t["logprob"]) for t in r["completion_probabilities"][0]["top_logprobs"]}


def logprob_drift(reference: list[Reference], served: list[list[dict[int, float]]]) -> dict:
    """The largest difference, in nats, between the HF model's and the server's log-probability of a token
    either one ranks first, teacher-forced along the HF model's greedy continuations. A token one side ranks
    first and the other leaves out of its top list has no number: `outside_top` says so."""
    worst = {"nats": 0.0, "prompt": 0, "position": 0, "outside_top": False}
    for p, (ref, steps) in enumerate(zip(reference, served)):
        for i, (hf_top, srv_top) in enumerate(zip(ref.top, steps)):
            firsts = {ref.tokens[i], max(srv_top, key=srv_top.get)}
            if not firsts <= hf_top.keys() & srv_top.keys():
                return {"nats": None, "prompt": p, "position": i, "outside_top": True}
            gap = max(abs(math.log(max(hf_top[t], 1e-12)) - srv_top[t]) for t in firsts)
            if gap > worst["nats"]:
                worst = {"nats": round(gap, 4), "prompt": p, "position": i, "outside_top": False}
    return worst


def verify(gguf: Path, lora: list[Path], reference: list[Reference], tokenizer, quant: str, mode: str,
           n: int, near_tie: float, logprob_tolerance: float | None = None) -> dict:
    """Template, EOS and greedy tokens; raises ExportVerificationFailed in strict mode on a mismatch.
    With `logprob_tolerance`, the teacher-forced log-probs too (`logprob_drift`), at any weight type."""
    info = read_gguf(gguf)
    problems = []
    if tokenizer.chat_template and info.chat_template != tokenizer.chat_template:
        problems.append("the chat template in the GGUF differs from the tokenizer's")
    if info.eos_token_id is not None and tokenizer.eos_token_id is not None \
            and info.eos_token_id != tokenizer.eos_token_id:
        problems.append(f"EOS id {info.eos_token_id} in the GGUF, {tokenizer.eos_token_id} in the tokenizer")
    served = served_answers(gguf, lora, reference, tokenizer, n, logprobs=logprob_tolerance is not None)
    if served["rendered"] != served["expected_rendered"]:
        problems.append("the server renders the chat template differently from the tokenizer")
    hf_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in served["expected_rendered"]]
    if served["tokenized"] != hf_ids:
        problems.append("the GGUF tokenizes the prompts differently from the HF tokenizer")
    agreement, ties = [], []
    for ref, got in zip(reference, served["tokens"]):  # both end with EOS where the model stopped
        same = 0
        for a, b in zip(ref.tokens, got):
            if a != b:
                break
            same += 1
        agreement.append(same / max(1, len(ref.tokens)))
        if got != ref.tokens:
            # Greedy decoding forks for good at the first differing token. When the HF model itself was
            # torn (the GGUF took a token the HF model rated within near_tie of its own choice, as a
            # log-probability margin: quantization moves logits, so the margin is measured in their
            # unit; two or three tokens can tie), that fork is rounding, not a broken export; anything
            # else (a token outside the HF model's top five, or a clear second) is a real mismatch.
            i = same
            gap = None
            if i < len(ref.tokens) and i < len(got) and got[i] in ref.top[i]:
                gap = math.log(ref.top[i][ref.tokens[i]]) - math.log(max(ref.top[i][got[i]], 1e-12))
            tie = gap is not None and gap <= near_tie
            ties.append({"position": i, "near_tie": tie, "gap": round(gap, 4) if gap is not None else None})
    exact = quant in EXACT_QUANTS
    if exact and any(not t["near_tie"] for t in ties):
        bad = next(t for t in ties if not t["near_tie"])
        why = (f"a token {bad['gap']:.2f} nats below the HF model's choice, over export.near_tie {near_tie}"
               if bad["gap"] is not None else "a token outside the HF model's top five")
        problems.append(f"greedy tokens of the {quant} GGUF differ from the HF model's "
                        f"(agreement per prompt: {', '.join(f'{a:.0%}' for a in agreement)}; "
                        f"first real fork at token {bad['position']}: {why})")
    drift = None
    if logprob_tolerance is not None:
        drift = logprob_drift(reference, served["logprobs"])
        where = f"prompt {drift['prompt'] + 1}, token {drift['position']}"
        if drift["outside_top"]:
            problems.append(f"a token one of the two models ranks first is outside the other's top list ({where})")
        elif drift["nats"] > logprob_tolerance:
            problems.append(f"teacher-forced log-probabilities of the {quant} GGUF and the HF model differ by "
                            f"{drift['nats']:.2f} nats ({where}), over the {logprob_tolerance} that rounding explains")
    result = {"agreement": agreement, "forks": ties, "exact_required": exact, "problems": problems,
              "passed": not problems}
    if drift is not None:
        result["logprob_drift"] = {**drift, "tolerance": logprob_tolerance}
    if problems and mode == "strict":
        raise ExportVerificationFailed(f"exported {gguf.name} failed verification: {'; '.join(problems)}. "
                                       "The iteration is not finished; fix or set export.verify = record, "
                                       "then run again to resume")
    return result


def _checkpoint_reference(hf_dir: Path, n: int) -> tuple[list[Reference], object]:
    """The checkpoint's greedy answers to the verification prompts, and its tokenizer (the model is let go)."""
    model, tokenizer = _load_checkpoint(hf_dir)
    return reference_tokens(model, tokenizer, n), tokenizer


def _save_merged(model, base_hf: Path, out: Path) -> Path:
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(base_hf, tmp)  # the LoRA does not touch the tokenizer: keep the base's, verbatim
    return out


def export_iteration(*, base_hf: Path, base_gguf: Path | None, adapter_dir: Path, out_dir: Path,
                     cfg: ExportConfig, params: int, on_step=None) -> Exported:
    """Adapter -> a GGUF to serve (or base GGUF + LoRA GGUF), verified. Seconds per step in `info`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 2)
        t = now
        if on_step:
            on_step({"step": name, "seconds": seconds[name]})

    model, tokenizer = _load_adapted(base_hf, adapter_dir)
    f16_verification = None
    reference = reference_tokens(model, tokenizer, cfg.verify_tokens) if cfg.verify != "off" else []
    step("load")
    if cfg.mode == "merged":
        quant = resolve_quant(cfg.quant, params)
        merged_dir = _save_merged(model, base_hf, out_dir / "merged")
        del model
        step("merge")
        name = read_gguf(base_gguf).metadata.get("general.name") if base_gguf is not None else None
        final, fallbacks, f16_verification = _checkpoint_to_gguf(merged_dir, out_dir / "model.gguf", quant,
                                                                 reference, tokenizer, cfg, step, name)
        serve, lora = final, []
    else:
        del model
        quant = "F16" if base_gguf is None else read_gguf(base_gguf).quant
        if base_gguf is None:  # a base given as an HF folder: convert it once per run
            base_gguf = out_dir.parent / "base-f16.gguf"
            if not base_gguf.exists():
                convert_hf_to_gguf(base_hf, base_gguf)
        adapter_gguf = convert_lora_to_gguf(adapter_dir, base_hf, out_dir / "adapter.gguf")
        step("convert")
        serve, lora, fallbacks = base_gguf, [adapter_gguf], 0
    verification = None
    if cfg.verify != "off":
        verification = verify(serve, lora, reference, tokenizer, quant, cfg.verify, cfg.verify_tokens, cfg.near_tie)
        verification = _with_f16(verification, f16_verification)
        step("verify")
    info = {"mode": cfg.mode, "quant": quant, "k_quant_fallback_tensors": fallbacks, "params": params,
            "seconds": seconds, "verification": verification}
    return Exported(serve_model=serve, serve_lora=lora, info=info)



def _checkpoint_to_gguf(hf_dir: Path, final: Path, quant: str, reference: list[Reference], tokenizer,
                        cfg: ExportConfig, step, model_name: str | None = None) -> tuple[Path, int, dict | None]:
    """HF checkpoint -> F16 GGUF -> `quant` at `final`. A quantized target has its F16 intermediate verified
    first, where exact agreement holds. Returns the file, the k-quant fallback count, the F16 verification.
    `model_name` is the GGUF's general.name (else the converter takes the folder's name): llama.cpp decides
    some tokenizer behaviour by it (Phi-3's special tokens strip the whitespace after them only in a model
    whose name says phi3), so an iteration keeps its base model's name, not "Merged"."""
    f16 = convert_hf_to_gguf(hf_dir, final.with_name(f"{final.stem}-f16.gguf"), model_name=model_name)
    step("convert")
    f16_verification, fallbacks = None, 0
    if cfg.verify != "off" and quant != "F16":
        f16_verification = verify(f16, [], reference, tokenizer, "F16", cfg.verify, cfg.verify_tokens, cfg.near_tie)
        step("verify_f16")
    if quant == "F16":
        os.replace(f16, final)
    else:
        fallbacks = quantize(f16, final, quant).fallback_tensors
        f16.unlink()
    step("quantize")
    return final, fallbacks, f16_verification


def _with_f16(verification: dict, f16_verification: dict | None) -> dict:
    if f16_verification is None:
        return verification
    return {**verification, "f16": f16_verification,
            "passed": verification["passed"] and f16_verification["passed"]}


def export_base(hf_dir: Path, out: Path, quant: str, model_name: str | None = None) -> dict:
    """A base model as isara serves it, made the way every iteration's model is: its HF checkpoint converted
    to F16 (verified strictly against the checkpoint), then quantized (agreement recorded). The base and the
    iterations then share a weight type, so what separates their answers is training, not quantization.
    Returns the verification."""
    cfg = ExportConfig(quant=quant, verify="strict")
    quant = quant.upper()
    reference, tokenizer = _checkpoint_reference(hf_dir, cfg.verify_tokens)
    _, _, f16_verification = _checkpoint_to_gguf(hf_dir, out, quant, reference, tokenizer, cfg, lambda name: None,
                                                 model_name)
    verification = verify(out, [], reference, tokenizer, quant, cfg.verify, cfg.verify_tokens, cfg.near_tie)
    return _with_f16(verification, f16_verification)


# A checkpoint derived from a GGUF holds that GGUF's own values, dequantized, so llama-server on the GGUF differs
# from it only by its arithmetic (activations rounded to 8 bits against quantized weights, F16 elsewhere).
# Measured, teacher-forced over the verification prompts (`logprob_drift`): 0.001 nats on the tiny test Llama at
# F16, 0.02 at Q8_0, 0.04 at Q4_1; 0.16 on SmolLM2-135M's catalog Q4_1 GGUF and 0.29 on its Q8_0 re-export (30
# layers of rounding). A checkpoint transformers loaded wrong (a permuted or missing tensor, a layer off by a
# factor) moves them by whole nats. The tolerance leaves bigger models' longer stacks room above 0.29.
DERIVED_TOLERANCE = 0.5


def verify_derived(hf_dir: Path, gguf: Path) -> dict:
    """export_base's check in reverse: the HF checkpoint derived from `gguf` must answer like llama-server on
    that GGUF (template, EOS, tokenization, greedy tokens recorded, teacher-forced log-probs within
    DERIVED_TOLERANCE). Returns the verification; `passed` and `problems` say whether it may be trained."""
    cfg = ExportConfig()
    reference, tokenizer = _checkpoint_reference(hf_dir, cfg.verify_tokens)
    return verify(gguf, [], reference, tokenizer, read_gguf(gguf).quant, "record", cfg.verify_tokens, cfg.near_tie,
                  logprob_tolerance=DERIVED_TOLERANCE)
