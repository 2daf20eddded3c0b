"""`isara bench`: engines, the machine's bounds, the ISARA phases and retrieval, measured side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table


from loop.cli.common import cli, console


@cli.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model to measure.")
@click.option("--quick", is_flag=True, help="Fewer requests, tokens and samples; no settings sweep (under 5 "
                                            "minutes on 2 cores).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for every engine.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/bench"),
              show_default=True, help="Where bench.json (and the scratch runs of the ISARA phases) go.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A run setting for the ISARA phases' runs (safety domain), as `isara run --set`; the bench's own "
                   "(samples, k, iterations) win. E.g. --set data.seeds=my.jsonl --set filters.min_answer_chars=8.")
def bench(model_name, quick, threads, out_dir, settings) -> None:
    """Measure side by side in one run: engines, the machine's bounds, the ISARA phases, retrieval.

    \b
    1. Generation: managed llama-server at 1/4/8/16 slots vs python -m
       llama_cpp.server vs transformers generate (batch 1 and 8): same prompts,
       same output length (EOS banned), prompt and generation tok/s, ratios to
       each other and to the machine's decode bounds (memory bandwidth for
       batch 1, matmul FLOP/s for batched); without --quick, also one
       llama-server setting at a time (threads, context, batch, KV cache, flash
       attention, weight type, prompt cache).
    2. ISARA generation at k = 2, 4, 8 demos: accepted/min, prompt tokens.
    3-4, 6. One iteration on the safety domain: seconds per phase, training
       tokens/s and peak memory, export steps merged vs lora, server start.
    5. Retrieval: the embedder on llama.cpp vs sentence-transformers (start,
       ms per text, agreement); USearch vs exact NumPy at 1k/10k(/100k) items.
    Writes bench.json.

    \b
    Example:
      isara bench --quick
    """
    from loop.bench import run_bench

    path = run_bench(model_name, quick=quick, threads=threads, out_dir=out_dir, settings=list(settings),
                     log=lambda s: console.print(s, highlight=False))
    _generation_table(json.loads(path.read_text())["generation"])
    console.print(f"results: {path}", highlight=False)


def _generation_table(rows: list[dict]) -> None:
    """bench.json's generation rows as a table, with the ratios the bench measured (piped or narrow: a block of
    phrases per row, nothing elided)."""
    from loop.fit import print_table

    table = Table(title="generation")
    for col in ("engine", "in flight", "gen tok/s", "prompt tok/s", "x llama_cpp.server", "x transformers",
                "% of bound", "% of int8 bound"):
        table.add_column(col)
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        table.add_row(r["engine"], str(r["in_flight"]), f"{r['gen_tok_s']:.1f}",
                      "-" if not r.get("prompt_tok_s") else f"{r['prompt_tok_s']:.0f}",
                      ratio(r["vs_llama_cpp_server"]), ratio(r["vs_transformers"]),
                      f"{r['share_of_bound']:.0%}" if r["share_of_bound"] is not None else "-",
                      f"{r['share_of_int8_bound']:.1%}" if r.get("share_of_int8_bound") is not None else "-")
    print_table(console, table)
