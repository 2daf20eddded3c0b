"""Verification: a GGUF answers like the checkpoint it came from, before anything serves it.

Verification exists because the most common complaint about exported
fine-tunes is gibberish: a lost chat template or EOS, a broken conversion. The
GGUF must carry the tokenizer's chat template and EOS, llama-server must render
and tokenize the prompts as the HF tokenizer does, and the F16 GGUF's greedy
answers to three fixed chat prompts must equal the HF model's (first
`export.verify_tokens` tokens). One exception, recorded as such: greedy
decoding forks at a token where the HF model itself hesitated (the GGUF picked
a token within `export.near_tie` of the HF model's choice, in log-probability):
that is rounding, not a broken export. Exactness is checked at F16 because
that is where it holds: on the default 135M model the F16 GGUF's log-probs sit
within 0.05 nats of the HF model's, Q8_0's move by up to 0.66, enough to flip
a near tie either way. So a quantized export is verified in two steps: its F16
intermediate strictly, before quantizing; the quantized file for template, EOS
and tokenization, with its greedy agreement recorded (loop/models/convert.py).

The same check runs in reverse for a user's GGUF (`verify_derived`): the HF
checkpoint transformers derives from it, to train on, must answer like
llama-server on that GGUF, compared by teacher-forced log-probabilities.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

from server.client import InferenceClient
from server.errors import ToolFailed
from server.gguf import read_gguf
from server.process import ManagedServer, ServerSettings

VERIFY_PROMPTS = ["What is the capital of France?", "Name three colors.", "Write one sentence about the sea."]
EXACT_QUANTS = ("F16", "BF16", "F32")  # greedy agreement is required at these
# The defaults of export.verify_tokens and export.near_tie (loop/config.py), and what the store's own checks use.
VERIFY_TOKENS = 16
NEAR_TIE = 0.3


class ExportVerificationFailed(ToolFailed):
    """The exported GGUF does not answer like the model it came from."""



def load_checkpoint(hf_dir: Path):
    """An HF checkpoint in float32, from safetensors only, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    return model.eval(), tok



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


def checkpoint_reference(hf_dir: Path, n: int) -> tuple[list[Reference], object]:
    """The checkpoint's greedy answers to the verification prompts, and its tokenizer (the model is let go)."""
    model, tokenizer = load_checkpoint(hf_dir)
    return reference_tokens(model, tokenizer, n), tokenizer


def with_f16(verification: dict, f16_verification: dict | None) -> dict:
    if f16_verification is None:
        return verification
    return {**verification, "f16": f16_verification,
            "passed": verification["passed"] and f16_verification["passed"]}



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
    reference, tokenizer = checkpoint_reference(hf_dir, VERIFY_TOKENS)
    return verify(gguf, [], reference, tokenizer, read_gguf(gguf).quant, "record", VERIFY_TOKENS, NEAR_TIE,
                  logprob_tolerance=DERIVED_TOLERANCE)
