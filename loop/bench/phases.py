"""The ISARA phases, each a real run (`loop.run.execute`) in a scratch runs folder
on the built-in safety domain, kept small: what is measured is where the time
goes, not the model's quality.

Generation at k = 2, 4, 8 demos: accepted samples per minute and prompt tokens
per sample, against the prompt processing share the engine's measured rates
predict. One iteration end to end: seconds per phase (generate, train, export,
eval), training tokens/s and peak memory, export steps merged against lora, a
cold server start on the new model; on CUDA, Unsloth against PEFT training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from server.process import ManagedServer, ServerSettings
from server.toolchain import cuda_available

from loop.config import load_config
from loop.layout import EXPORT, STEPS, TRAIN, RunLayout, phase_name
from loop.run import execute, load_run_samples, run_dir_for
from loop.state import RunState


def _run(work: Path, name: str, overrides: list[str], settings: list[str] = ()) -> Path:
    """`settings`: the user's `--set KEY=VALUE`s, on top of the safety domain; the bench's own (the run's
    name and folder, one iteration, the parameter measured) come last and win."""
    cfg = load_config(None, ['domain="safety"', *settings, f'name="{name}"', f'runs_dir="{work}"', "iterations=1",
                             *overrides])
    run_dir = run_dir_for(cfg)
    execute(cfg, run_dir, output="quiet")
    return run_dir


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 3) if whole else None


def bench_generation_k(work: Path, model: str, *, ks=(2, 4, 8), samples: int = 16, slots: int = 8,
                       prompt_tok_s: float | None = None, gen_tok_s: float | None = None, settings: list[str] = (),
                       log=print) -> list[dict]:
    """Accepted samples per minute and prompt tokens per sample for k demos; where the server's time goes.

    The server's own per-request timings overlap (slots share each batch), so the share of prompt
    processing is also estimated from the tokens and the engine's measured rates at this many slots
    (`prompt_tok_s`, `gen_tok_s`): prompt tokens / prompt rate against output tokens / decode rate."""
    rows = []
    for k in ks:
        run = _run(work, f"gen-k{k}", [f'model.base="{model}"', f"retrieval.k={k}", f"generation.samples={samples}",
                                       f"generation.slots={slots}", "train.enabled=false", "eval.enabled=false"],
                   settings)
        st = json.loads(RunLayout(run).stats(1).read_text())
        q, a = st["question_stage"], st["answer_stage"]
        server_ms = q["server_prompt_ms"] + q["server_gen_ms"] + a["server_prompt_ms"] + a["server_gen_ms"]
        row = {"k": k, "slots": slots, "accepted": st["accepted"], "attempts": st["attempts"],
               "acceptance_rate": st["acceptance_rate"], "accepted_per_minute": st["accepted_per_minute"],
               "seconds": st["seconds_this_session"],
               "prompt_tokens_per_sample": round((q["prompt_tokens"] + a["prompt_tokens"]) / max(1, st["accepted"])),
               "stage1_prompt_tokens": round(q["prompt_tokens"] / max(1, q["requests"])),
               "stage2_prompt_tokens": round(a["prompt_tokens"] / max(1, a["requests"])),
               "stage2_prompt_share_of_server_time": _share(a["server_prompt_ms"], server_ms),
               "prompt_share_of_server_time": _share(q["server_prompt_ms"] + a["server_prompt_ms"], server_ms),
               "prompt_tokens": q["prompt_tokens"] + a["prompt_tokens"],
               # what llama-server's prompt cache saved: the prompt tokens of each stage it did not compute
               "stage1_cached_share": _share(q.get("cached_tokens", 0), q["prompt_tokens"]) or 0.0,
               "stage2_cached_share": _share(a.get("cached_tokens", 0), a["prompt_tokens"]) or 0.0,
               "completion_tokens": q["completion_tokens"] + a["completion_tokens"]}
        if prompt_tok_s and gen_tok_s:
            pp = {"q": q["prompt_tokens"] / prompt_tok_s, "a": a["prompt_tokens"] / prompt_tok_s}
            decode = row["completion_tokens"] / gen_tok_s
            row["est_prompt_share"] = _share(pp["q"] + pp["a"], pp["q"] + pp["a"] + decode)
            row["est_stage2_prompt_share"] = _share(pp["a"], pp["q"] + pp["a"] + decode)
        rows.append(row)
        log(f"ISARA generation k={k}: {row['accepted_per_minute']} accepted/min ({row['accepted']}/{row['attempts']}"
            f" accepted), {row['prompt_tokens_per_sample']} prompt tokens per sample (stage 1 "
            f"{row['stage1_prompt_tokens']}, stage 2 {row['stage2_prompt_tokens']} per request; from the prompt cache: "
            f"stage 1 {row['stage1_cached_share']:.0%}, stage 2 {row['stage2_cached_share']:.0%})"
            + (f"; prompt processing ~{row['est_prompt_share']:.0%} of the work, stage 2's "
               f"~{row['est_stage2_prompt_share']:.0%}" if "est_prompt_share" in row else ""))
    return rows


def bench_iteration(work: Path, model: str, *, samples: int = 16, slots: int = 8, epochs: float = 1.0,
                    eval_n: int = 10, settings: list[str] = (), log=print) -> dict:
    """One iteration end to end (generate, train, export, eval) with seconds per phase and per export
    step; then the same adapter exported in lora mode, and a cold server start on the new model."""
    from loop.models.convert import count_params, export_iteration
    from loop.models.store import prepared_base

    run = _run(work, "iteration", [f'model.base="{model}"', f"generation.samples={samples}",
                                   f"generation.slots={slots}", f"train.epochs={epochs}", f"eval.n={eval_n}",
                                   "eval.max_tokens=32", "eval.baselines=false"], settings)
    state, layout = RunState(run), RunLayout(run)
    phases = {step: state.seconds(phase_name(1, step)) for step in STEPS if state.recorded(phase_name(1, step))}
    train, export = state.stats(phase_name(1, TRAIN)), state.stats(phase_name(1, EXPORT))
    result = {"phases_s": phases, "total_s": round(sum(v or 0 for v in phases.values()), 1),
              "train": {k: train.get(k) for k in ("backend", "samples", "steps", "tokens", "tokens_per_s",
                                                  "peak_rss_mb", "peak_vram_mb", "first_loss", "last_loss")},
              "export_merged_s": export["seconds"], "quant": export["quant"]}
    log("iteration: " + ", ".join(f"{p} {s}s" for p, s in phases.items()) + f" (total {result['total_s']}s)")
    log(f"training ({train['backend']}): {train['tokens_per_s']} tokens/s, {train['steps']} steps on "
        f"{train['samples']} samples, peak RSS {train['peak_rss_mb']} MB")
    log("export merged: " + ", ".join(f"{k} {v}s" for k, v in export["seconds"].items()))

    base = prepared_base(layout.base_model)  # as the run served and trained it
    cfg = load_config(run / "config.toml", base_dir=run)
    t0 = time.perf_counter()
    lora = export_iteration(base_hf=base.hf_dir, base_gguf=base.gguf, adapter_dir=layout.adapter(1),
                            out_dir=work / "lora-export", cfg=cfg.export.model_copy(update={"mode": "lora"}),
                            params=count_params(base.hf_dir))
    result["export_lora_s"] = {**lora.info["seconds"], "total": round(time.perf_counter() - t0, 2)}
    log("export lora:   " + ", ".join(f"{k} {v}s" for k, v in result["export_lora_s"].items()))

    served = layout.resolve(export["serve_model"])
    t0 = time.perf_counter()
    with ManagedServer(ServerSettings(model=served, slots=slots)):
        result["server_start_s"] = round(time.perf_counter() - t0, 2)
    log(f"server start on the new model: {result['server_start_s']}s")
    if cuda_available():
        result["unsloth_vs_peft"] = _unsloth_vs_peft(run, base.hf_dir, cfg, log)
    return result


def _unsloth_vs_peft(run: Path, hf_dir: Path, cfg, log) -> dict:
    """On CUDA: both training backends on the iteration's data, same settings."""
    from loop.training.train import train

    layout = RunLayout(run)
    samples = load_run_samples(layout.seeds, "seed") + load_run_samples(layout.generated(1), "generated")
    out = {}
    for backend in ("peft", "unsloth"):
        res = train(hf_dir, samples, cfg.train.model_copy(update={"backend": backend}),
                    run / f"bench-{backend}" / "adapter")
        out[backend] = {"tokens_per_s": round(res.tokens_per_s, 1), "peak_vram_mb": res.peak_vram_mb}
    out["ratio"] = round(out["unsloth"]["tokens_per_s"] / out["peft"]["tokens_per_s"], 2)
    log(f"training on CUDA: Unsloth {out['unsloth']['tokens_per_s']} vs PEFT {out['peft']['tokens_per_s']} tokens/s "
        f"({out['ratio']}x)")
    return out
