"""Generation engines, side by side in one process on the same inputs.

Measures generated tokens/s (short prompts, the same output length, EOS banned
on every engine) and prompt tokens/s (ISARA-shaped prompts: four demo pairs and
a question, prompt cache off) through the managed native llama-server at 1, 4,
8 and 16 slots, against `python -m llama_cpp.server` (1 and 8 in flight) and
Hugging Face transformers `generate` (batch 1 and 8, float32): each row's ratio
to the other two engines at the same number in flight is set here
(`engine_ratios`). Ratios measured in one run are the numbers to trust;
absolute times on a shared machine are noise.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from server.client import Endpoint, InferenceClient
from server.process import ManagedServer, ServerSettings

PROMPTS = [
    "Question: How do plants make food?\nAnswer:",
    "Question: Why is the sky blue?\nAnswer:",
    "Question: What is a prime number?\nAnswer:",
    "Question: How does a bicycle stay upright?\nAnswer:",
    "Question: What causes the seasons?\nAnswer:",
    "Question: How do vaccines work?\nAnswer:",
    "Question: What is inflation in economics?\nAnswer:",
    "Question: Why do cats purr?\nAnswer:",
]

# Four demo pairs, then a question: the shape of a stage-2 or ICL-kNN prompt, the prefix shared.
DEMOS = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in (
    ("How do plants make food?", "Plants make food by photosynthesis: their leaves take in light, water and "
     "carbon dioxide and turn them into sugar and oxygen."),
    ("Why is the sky blue?", "Air scatters short blue wavelengths of sunlight far more than red ones, so blue "
     "light reaches our eyes from every direction of the sky."),
    ("What is a prime number?", "A whole number greater than one whose only divisors are one and itself, such "
     "as 2, 3, 5, 7 and 11."),
    ("What causes the seasons?", "The tilt of the Earth's axis: each hemisphere leans towards the sun for part "
     "of the year and gets more direct light and longer days.")))


async def drive(url: str, in_flight: int, n_requests: int, max_tokens: int, eos_id: int | None,
                prompts: list[str] = PROMPTS, **extra) -> dict:
    """`n_requests` completions through an OpenAI-compatible server, `in_flight` at a time, after one warm-up."""
    # EOS is banned so every request generates exactly max_tokens on every engine.
    bias = {str(eos_id): -100} if eos_id is not None else {}
    async with InferenceClient([Endpoint(url, slots=in_flight)], retries=0) as client:
        await client.complete("Hello", max_tokens=4, temperature=0.0)  # warm-up: load, first allocations
        t0 = time.perf_counter()
        results = await asyncio.gather(*(
            client.complete(prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0.7, seed=i,
                            logit_bias=bias, **extra) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    gen = sum(r.completion_tokens for r in results)
    return {"requests": n_requests, "in_flight": in_flight, "completion_tokens": gen, "wall_s": round(wall, 4),
            "gen_tok_s": round(gen / wall, 1), "prompt_tokens": sum(r.prompt_tokens for r in results),
            "max_tokens": max_tokens}


def bench_generation(gguf: Path, *, native_in_flight=(1, 4, 8, 16), python_in_flight=(1, 8), n_requests: int = 16,
                     max_tokens: int = 64, prompt_in_flight=(1, 4, 8, 16), threads: int | None = None,
                     log=print) -> list[dict]:
    """Decode: short prompts, `max_tokens` each, EOS banned. Prompt processing, measured apart (at the
    numbers in flight in `prompt_in_flight`): ISARA-shaped prompts (four demo pairs and a question, ~270
    tokens, prompt cache off) with one output token, prompt tokens over the wall time."""
    from server.gguf import read_gguf

    eos = read_gguf(gguf).eos_token_id
    # A different first line each: no engine can reuse one prompt's cache for the next.
    long_prompts = [f"Topic {i}: everyday science.\n\n" + DEMOS + f"Question: {p.split('Question: ')[1]}"
                    for i, p in enumerate(PROMPTS)]
    rows = []
    # llama_cpp.server serializes requests: more than 8 in flight only queue.
    for engine, backend, in_flight in (("llama-server (managed)", "native", native_in_flight),
                                       ("llama_cpp.server", "python", python_in_flight)):
        for n in in_flight:
            # 1024 a slot: the ISARA-shaped prompts are ~270 tokens in SmolLM2's vocabulary, more in a model's
            # that spends more tokens on English (579 in the tests' tiny one)
            settings = ServerSettings(model=gguf, backend=backend, slots=n, ctx_per_slot=1024, threads=threads)
            with ManagedServer(settings) as srv:
                row = asyncio.run(drive(srv.base_url, n, max(n_requests, n), max_tokens, eos))
                row["prompt_tok_s"] = None  # short prompts: their timing says nothing about prompt speed
                if n in prompt_in_flight:
                    pp = asyncio.run(drive(srv.base_url, n, len(long_prompts), 1, None, long_prompts,
                                           cache_prompt=False))
                    prompt_tokens = pp["prompt_tokens"]
                    row["prompt_tok_s"] = round(prompt_tokens / pp["wall_s"], 1)
            row["engine"] = engine
            rows.append(row)
            extra = f"; prompts {row['prompt_tok_s']} tok/s" if row["prompt_tok_s"] else ""
            log(f"{engine:24s} in flight {n:2d}: {row['gen_tok_s']:7.1f} tok/s generated "
                f"({row['completion_tokens']} tokens in {row['wall_s']} s{extra})")
    return rows


def bench_hf_generate(hf_dir: Path, *, batches=(1, 8), n_requests: int = 16, max_tokens: int = 64,
                      threads: int | None = None, log=print) -> list[dict]:
    """Hugging Face transformers `generate` on the same prompts and output length (EOS suppressed),
    in batches of 1 and 8 (left-padded), float32 on CPU: what a hand-rolled script would use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    rows = []
    for b in batches:
        with torch.no_grad():
            warm = tok(prompts[:b], return_tensors="pt", padding=True)
            model.generate(**warm, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
            t0 = time.perf_counter()
            generated = 0
            for i in range(0, len(prompts), b):
                enc = tok(prompts[i:i + b], return_tensors="pt", padding=True)
                out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=True,
                                     temperature=0.7, pad_token_id=tok.pad_token_id)
                generated += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
            wall = time.perf_counter() - t0
        row = {"engine": "transformers generate", "in_flight": b, "requests": len(prompts),
               "completion_tokens": generated, "wall_s": round(wall, 2), "gen_tok_s": round(generated / wall, 1),
               "prompt_tok_s": None, "max_tokens": max_tokens}
        rows.append(row)
        log(f"{'transformers generate':24s} batch     {b:2d}: {row['gen_tok_s']:7.1f} tok/s generated "
            f"({generated} tokens in {row['wall_s']} s)")
    return rows


# The engines every row is compared with at the same number in flight, and the keys of those ratios.
COMPARED = (("vs_llama_cpp_server", "llama_cpp.server"), ("vs_transformers", "transformers generate"))


def engine_ratios(rows: list[dict]) -> None:
    """Set on each row its generation speed over llama_cpp.server's and transformers' at the same number in
    flight (None where that engine was not measured at it)."""
    by = {(r["engine"], r["in_flight"]): r["gen_tok_s"] for r in rows}
    for r in rows:
        for key, engine in COMPARED:
            other = by.get((engine, r["in_flight"]))
            r[key] = round(r["gen_tok_s"] / other, 2) if other else None
