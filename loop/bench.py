"""`isara bench`: measure, side by side in one process, on the same inputs.

Generation: the same prompts and output lengths through the managed native
llama-server (1, 4, 8 and 16 slots), `python -m llama_cpp.server` and
transformers `generate`; the machine's bounds; what each llama-server setting
does at 8 in flight; USearch against exact search. The ISARA phases are in
`loop.bench_phases`. Ratios measured in one run are the numbers to trust;
absolute times on a shared machine are noise.
"""

from __future__ import annotations

import asyncio
import platform
import time
from dataclasses import replace
from pathlib import Path

import psutil

from server.client import Endpoint, InferenceClient
from server.process import ManagedServer, ServerSettings
from server.toolchain import cuda_available

from loop.files import write_json_atomic

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


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": _cpu_name(), "cores_logical": psutil.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "gpu": "CUDA" if cuda_available() else "none"}


async def _drive(url: str, in_flight: int, n_requests: int, max_tokens: int, eos_id: int | None,
                 prompts: list[str] = PROMPTS, **extra) -> dict:
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
    long_prompts = [f"Topic {i}: everyday science.\n\n" + _DEMOS + f"Question: {p.split('Question: ')[1]}"
                    for i, p in enumerate(PROMPTS)]
    rows = []
    # llama_cpp.server serializes requests: more than 8 in flight only queue.
    for engine, backend, in_flight in (("llama-server (managed)", "native", native_in_flight),
                                       ("llama_cpp.server", "python", python_in_flight)):
        for n in in_flight:
            settings = ServerSettings(model=gguf, backend=backend, slots=n, ctx_per_slot=512, threads=threads)
            with ManagedServer(settings) as srv:
                row = asyncio.run(_drive(srv.base_url, n, max(n_requests, n), max_tokens, eos))
                row["prompt_tok_s"] = None  # short prompts: their timing says nothing about prompt speed
                if n in prompt_in_flight:
                    pp = asyncio.run(_drive(srv.base_url, n, len(long_prompts), 1, None, long_prompts,
                                            cache_prompt=False))
                    prompt_tokens = pp["prompt_tokens"]
                    row["prompt_tok_s"] = round(prompt_tokens / pp["wall_s"], 1)
            row["engine"] = engine
            rows.append(row)
            extra = f"; prompts {row['prompt_tok_s']} tok/s" if row["prompt_tok_s"] else ""
            log(f"{engine:24s} in flight {n:2d}: {row['gen_tok_s']:7.1f} tok/s generated "
                f"({row['completion_tokens']} tokens in {row['wall_s']} s{extra})")
    return rows


def write_results(rows: list[dict], out_dir: Path, command: str, extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
            "generation": rows, **(extra or {})}
    path = out_dir / "bench.json"
    write_json_atomic(path, data)
    return path


def bench_retrieval(sizes=(1_000, 10_000, 100_000), dim: int = 384, queries: int = 200, k: int = 8,
                    seed: int = 0, log=print) -> list[dict]:
    """USearch (the run's index settings: cosine, f16) vs exact NumPy search: latency and recall@k.

    Vectors are clustered (like sentence embeddings of one domain), not uniform noise, on which
    approximate search is unrealistically easy or hard."""
    import numpy as np
    from usearch.index import Index

    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        centers = rng.standard_normal((max(8, n // 100), dim)).astype(np.float32)
        data = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        q = data[rng.integers(0, n, queries)] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t0 = time.perf_counter()
        index = Index(ndim=dim, metric="cos", dtype="f16")
        index.add(np.arange(n), data)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = [index.search(v, k).keys for v in q]
        us = (time.perf_counter() - t0) / queries
        t0 = time.perf_counter()
        exact = [np.argpartition(-(data @ v), k)[:k] for v in q]
        np_s = (time.perf_counter() - t0) / queries
        recall = float(np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact)]))
        row = {"items": n, "dim": dim, "k": k, "usearch_ms": round(us * 1000, 3), "numpy_ms": round(np_s * 1000, 3),
               "speedup": round(np_s / us, 1), "recall_at_k": round(recall, 4), "usearch_build_s": round(build, 2)}
        rows.append(row)
        log(f"retrieval {n:>7d} items: usearch {row['usearch_ms']:.3f} ms, numpy {row['numpy_ms']:.3f} ms "
            f"({row['speedup']}x), recall@{k} {row['recall_at_k']:.3f}")
    return rows


def machine_limits(threads: int | None = None) -> dict:
    """Memory bandwidth (a large copy) and matrix-multiply FLOP/s, the two bounds of decoding:
    batch-1 decode reads every weight once a token (bandwidth / model bytes); batched decode does
    2 x parameters FLOP a token (FLOP/s / (2 x parameters))."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    src = np.ones(256 * 2**20 // 8)  # 256 MiB, far beyond the caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * src.nbytes / best  # read + write
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    flops = 2 * 1024**3 / best
    return {"memory_gb_s": round(bandwidth / 1e9, 1), "matmul_gflop_s_f32": round(flops / 1e9, 1),
            "torch_threads": torch.get_num_threads()}


def bounds(limits: dict, model_bytes: int, params: int) -> dict:
    return {"decode_batch1_tok_s": round(limits["memory_gb_s"] * 1e9 / model_bytes, 1),
            "decode_batched_tok_s": round(limits["matmul_gflop_s_f32"] * 1e9 / (2 * params), 1)}


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


# --- why batched decode is where it is: one setting at a time -------------------

def _variant_models(gguf: Path, hf_dir: Path, work: Path, source: Path | None = None) -> dict[str, Path]:
    """The default model at the weight types it is not served at: F16 and Q8_0 converted from its HF checkpoint
    (once, into `work`), and the catalog's own GGUF where isara serves a re-export of it."""
    from server.gguf import convert_hf_to_gguf, quantize, read_gguf

    served = read_gguf(gguf).quant
    work.mkdir(parents=True, exist_ok=True)
    f16, q8 = work / "model-f16.gguf", work / "model-q8_0.gguf"
    if not f16.exists():
        convert_hf_to_gguf(hf_dir, f16)
    out = {"F16": f16}
    if served != "Q8_0":
        if not q8.exists():
            quantize(f16, q8, "Q8_0")
        out["Q8_0"] = q8
    if source is not None:
        out[f"{read_gguf(source).quant} (catalog GGUF)"] = source
    return {q: path for q, path in out.items() if q != served}


def bench_server_variants(gguf: Path, hf_dir: Path | None, work: Path, *, source: Path | None = None,
                          in_flight: int = 8, n_requests: int = 16, max_tokens: int = 64, log=print) -> list[dict]:
    """Batched decode at `in_flight` with one llama-server setting changed at a time: threads, context per
    slot, batch sizes, KV cache type, flash attention, weight type; and prompt caching of a shared prefix."""
    from server.gguf import read_gguf

    eos = read_gguf(gguf).eos_token_id
    variants = [("default", {}, []), ("threads 1", {"threads": 1}, []), ("threads 2", {"threads": 2}, []),
                ("ctx per slot 2048", {"ctx_per_slot": 2048}, []), ("batch / ubatch 64", {}, ["-b", "64", "-ub", "64"]),
                ("flash attention off (default auto)", {}, ["-fa", "off"]),
                ("KV cache q8_0", {}, ["-ctk", "q8_0", "-ctv", "q8_0"])]
    others = _variant_models(gguf, hf_dir, work, source) if hf_dir is not None else {}
    variants += [(f"{q} weights", {"model": path}, []) for q, path in others.items()]
    rows = []
    for label, changes, args in variants:
        settings = replace(ServerSettings(model=gguf, slots=in_flight, ctx_per_slot=512, extra_args=args), **changes)
        with ManagedServer(settings) as srv:
            row = asyncio.run(_drive(srv.base_url, in_flight, max(n_requests, in_flight), max_tokens, eos))
        rows.append({"variant": label, **row})
        log(f"llama-server, {in_flight} in flight, {label:34s}: {row['gen_tok_s']:7.1f} tok/s generated")
    base = rows[0]["gen_tok_s"]
    for r in rows:
        r["vs_default"] = round(r["gen_tok_s"] / base, 2)
    # The same weight types through llama_cpp.server: the engine ratio at each type, not across types.
    for q, path in [("default", gguf), *others.items()]:
        with ManagedServer(ServerSettings(model=path, backend="python", slots=1, ctx_per_slot=512)) as srv:
            row = asyncio.run(_drive(srv.base_url, in_flight, max(n_requests, in_flight), max_tokens, eos))
        mine = next(r for r in rows if r["variant"] == (f"{q} weights" if q != "default" else "default"))
        rows.append({"variant": f"llama_cpp.server, {q} weights", **row,
                     "llama_server_vs_this": round(mine["gen_tok_s"] / row["gen_tok_s"], 2)})
        log(f"llama_cpp.server, {in_flight} in flight, {q} weights: {row['gen_tok_s']:7.1f} tok/s generated "
            f"(llama-server: {rows[-1]['llama_server_vs_this']}x)")
    rows += _prompt_cache(gguf, in_flight, log)
    return rows


# Four demo pairs, then a question: the shape of a stage-2 or ICL-kNN prompt, the prefix shared.
_DEMOS = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in (
    ("How do plants make food?", "Plants make food by photosynthesis: their leaves take in light, water and "
     "carbon dioxide and turn them into sugar and oxygen."),
    ("Why is the sky blue?", "Air scatters short blue wavelengths of sunlight far more than red ones, so blue "
     "light reaches our eyes from every direction of the sky."),
    ("What is a prime number?", "A whole number greater than one whose only divisors are one and itself, such "
     "as 2, 3, 5, 7 and 11."),
    ("What causes the seasons?", "The tilt of the Earth's axis: each hemisphere leans towards the sun for part "
     "of the year and gets more direct light and longer days.")))


def _prompt_cache(gguf: Path, in_flight: int, log) -> list[dict]:
    """Prompt processing of 16 prompts sharing a demo prefix, with llama-server's prompt cache on and off."""
    prompts = [_DEMOS + f"Question: {p.split('Question: ')[1]}" for p in PROMPTS] * 2
    rows = []
    with ManagedServer(ServerSettings(model=gguf, slots=in_flight, ctx_per_slot=1024)) as srv:
        for cache in (True, False):
            row = asyncio.run(_drive(srv.base_url, in_flight, len(prompts), 8, None, prompts, cache_prompt=cache))
            rows.append({"variant": f"shared demo prefix, prompt cache {'on' if cache else 'off'}", **row})
            log(f"llama-server, {len(prompts)} prompts with a shared demo prefix, prompt cache "
                f"{'on ' if cache else 'off'}: {row['wall_s']:.2f} s")
    return rows
