"""Why batched decode is where it is: one llama-server setting at a time.

Measures generated tokens/s at 8 in flight with one setting changed against the
default (threads, context per slot, batch sizes, flash attention, KV cache
type, the weight types the model is not served at: F16, Q8_0, the catalog's
own GGUF), each weight type also through `python -m llama_cpp.server` (the
engine ratio at that type), and prompt processing of prompts sharing a demo
prefix with llama-server's prompt cache on against off. Full `isara bench` only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.process import ManagedServer, ServerSettings

from loop.bench.engines import DEMOS, PROMPTS, drive


def variant_models(gguf: Path, hf_dir: Path, work: Path, source: Path | None = None) -> dict[str, Path]:
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
    others = variant_models(gguf, hf_dir, work, source) if hf_dir is not None else {}
    variants += [(f"{q} weights", {"model": path}, []) for q, path in others.items()]
    rows = []
    for label, changes, args in variants:
        settings = ServerSettings(**{"model": gguf, "slots": in_flight, "ctx_per_slot": 512, "extra_args": args,
                                     **changes})
        with ManagedServer(settings) as srv:
            row = asyncio.run(drive(srv.base_url, in_flight, max(n_requests, in_flight), max_tokens, eos))
        rows.append({"variant": label, **row})
        log(f"llama-server, {in_flight} in flight, {label:34s}: {row['gen_tok_s']:7.1f} tok/s generated")
    base = rows[0]["gen_tok_s"]
    for r in rows:
        r["vs_default"] = round(r["gen_tok_s"] / base, 2)
    # The same weight types through llama_cpp.server: the engine ratio at each type, not across types.
    for q, path in [("default", gguf), *others.items()]:
        with ManagedServer(ServerSettings(model=path, backend="python", slots=1, ctx_per_slot=512)) as srv:
            row = asyncio.run(drive(srv.base_url, in_flight, max(n_requests, in_flight), max_tokens, eos))
        mine = next(r for r in rows if r["variant"] == (f"{q} weights" if q != "default" else "default"))
        rows.append({"variant": f"llama_cpp.server, {q} weights", **row,
                     "llama_server_vs_this": round(mine["gen_tok_s"] / row["gen_tok_s"], 2)})
        log(f"llama_cpp.server, {in_flight} in flight, {q} weights: {row['gen_tok_s']:7.1f} tok/s generated "
            f"(llama-server: {rows[-1]['llama_server_vs_this']}x)")
    rows += _prompt_cache(gguf, in_flight, log)
    return rows



def _prompt_cache(gguf: Path, in_flight: int, log) -> list[dict]:
    """Prompt processing of 16 prompts sharing a demo prefix, with llama-server's prompt cache on and off."""
    prompts = [DEMOS + f"Question: {p.split('Question: ')[1]}" for p in PROMPTS] * 2
    rows = []
    with ManagedServer(ServerSettings(model=gguf, slots=in_flight, ctx_per_slot=1024)) as srv:
        for cache in (True, False):
            row = asyncio.run(drive(srv.base_url, in_flight, len(prompts), 8, None, prompts, cache_prompt=cache))
            rows.append({"variant": f"shared demo prefix, prompt cache {'on' if cache else 'off'}", **row})
            log(f"llama-server, {len(prompts)} prompts with a shared demo prefix, prompt cache "
                f"{'on ' if cache else 'off'}: {row['wall_s']:.2f} s")
    return rows
