"""`isara bench`: measure, side by side in one run on the same inputs, what ISARA's speed rests on.

- `machine`: memory bandwidth and matmul throughput (f32, bf16, int8), and the decode bounds they set.
- `engines`: generation through the managed llama-server against llama_cpp.server and transformers `generate`.
- `variants`: one llama-server setting at a time at 8 in flight (not with --quick).
- `phases`: ISARA generation at k = 2, 4, 8 demos; one iteration end to end.
- `training`: isara's trainer against transformers' Trainer and trl's SFTTrainer on that iteration's
  training set, same settings, with the machine's bound (not with --quick).
- `retrieval`: the embedder on llama.cpp against sentence-transformers; USearch against exact NumPy search.
- `results`: bench.json.

Ratios measured in one run are the numbers to trust; absolute times on a shared machine are noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from server.errors import BadInput

from loop.bench.engines import bench_generation, bench_hf_generate, engine_ratios
from loop.bench.machine import bounds, machine_limits, share_of_bound
from loop.bench.phases import bench_generation_k, bench_iteration
from loop.bench.results import write_results
from loop.bench.retrieval import bench_embedders, bench_retrieval
from loop.bench.training import bench_training
from loop.bench.variants import bench_server_variants


def run_bench(model_name: str, *, quick: bool = False, threads: int | None = None,
              out_dir: Path = Path("runs/bench"), settings: list[str] = (), log=print) -> Path:
    """Every part in turn on `model_name`; writes `out_dir/bench.json` (the ISARA phases' scratch runs go in
    `out_dir/work`) and returns its path. `quick`: fewer requests, tokens and samples, no settings sweep.
    `settings`: `KEY=VALUE` run settings for the ISARA phases' runs (checked before anything is measured)."""
    from loop.models.convert import count_params
    from loop.models.local import add_local
    from loop.models.store import resolve_model

    from loop.config import load_config

    load_config(None, ['domain="safety"', *settings])  # a bad --set fails now, not after minutes of measuring
    m = resolve_model(model_name)
    if m.entry is None:  # the user's HF folder or GGUF file: served and trained as a run would (made once, kept)
        m = add_local(model_name, log=log)
    if m.gguf is None:
        raise BadInput(f"{model_name} has no GGUF to benchmark: give a .gguf file, an HF folder or a catalog chat "
                       "model")
    limits = machine_limits(threads)
    params = count_params(m.hf_dir) if m.hf_dir else None
    bound = bounds(limits, m.gguf.stat().st_size, params) if params else {}
    log(f"machine: memory {limits['memory_gb_s']} GB/s, matmul {limits['matmul_gflop_s_f32']} GFLOP/s (f32), "
        f"{limits['matmul_gop_s_int8']} GOP/s (int8) -> decode bounds: batch 1 {bound.get('decode_batch1_tok_s')} "
        f"tok/s, batched {bound.get('decode_batched_tok_s')} tok/s (f32), "
        f"{bound.get('decode_batched_int8_tok_s')} tok/s (int8, what Q8_0 computes in)")
    n, tokens = (8, 32) if quick else (16, 64)
    rows = bench_generation(m.gguf, n_requests=n, max_tokens=tokens, threads=threads, log=log,
                            prompt_in_flight=(8,) if quick else (1, 4, 8, 16))
    if m.hf_dir is not None:
        rows += bench_hf_generate(m.hf_dir, n_requests=n, max_tokens=tokens, threads=threads, log=log)
    engine_ratios(rows)
    share_of_bound(rows, bound)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    extra = {"limits": limits, "bounds": bound, "params": params}
    if not quick:
        extra["server_variants"] = bench_server_variants(m.gguf, m.hf_dir, work / "models",
                                                        source=m.source_gguf, log=log)
    samples = 4 if quick else 24
    if m.hf_dir is not None:
        at8 = next(r for r in rows if r["engine"] == "llama-server (managed)" and r["in_flight"] == 8)
        extra["isara_generation"] = bench_generation_k(work, model_name, samples=samples, log=log,
                                                       prompt_tok_s=at8["prompt_tok_s"], gen_tok_s=at8["gen_tok_s"],
                                                       settings=settings)
        extra["iteration"] = bench_iteration(work, model_name, samples=samples, epochs=0.25 if quick else 1.0,
                                             eval_n=4 if quick else 20, settings=settings, log=log)
        if not quick:
            from loop.config import TrainConfig
            from loop.layout import RunLayout
            from loop.phases import load_run_samples

            layout = RunLayout(work / "iteration")
            train_set = load_run_samples(layout.seeds, "seed") + load_run_samples(layout.generated(1), "generated")
            extra["training"] = bench_training(m.hf_dir, train_set, TrainConfig(), work / "training",
                                               limits=limits, log=log)
    embedder = resolve_model(load_config(None, ['domain="safety"', *settings]).model.embedder)
    if embedder.embedder_dir is not None:  # the same texts every time: examples/seeds.jsonl, both halves
        from loop.data import read_jsonl
        from loop.models.store import REPO_ROOT

        texts = [t for r in read_jsonl(REPO_ROOT / "examples" / "seeds.jsonl") for t in (r["prompt"], r["response"])]
        extra["embedder"] = bench_embedders(embedder.embedder_dir, texts, log=log)
    extra["retrieval"] = bench_retrieval(sizes=(1_000, 10_000) if quick else (1_000, 10_000, 100_000), log=log)
    return write_results(rows, out_dir, "isara bench" + (" --quick" if quick else ""), extra=extra)
