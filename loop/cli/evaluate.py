"""`isara eval`: a model, or a run's model, on the eval sets (and a run's held-out seeds)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table


from loop.cli.common import cli, console, err_console, iteration_option, runs_dir_option, target_of


# Decoding settings `isara eval RUN` takes from the run's own config.toml unless given: a run's model is then
# scored as the run scored it.
RUN_DECODING = ("max_tokens", "repeat_penalty", "dry_multiplier")


def eval_option(key: str, **kw):
    """`isara eval`'s flag for a key of the run's [eval] section: its default and help come from the schema,
    so the command and a run's evaluation can't drift apart."""
    from loop.config import EvalConfig

    field = EvalConfig.model_fields[key]
    if key in RUN_DECODING:
        return click.option(f"--{key.replace('_', '-')}", key, default=None, **kw,
                            help=f"{field.description} Default: a run's own [eval] setting, else {field.default}.")
    return click.option(f"--{key.replace('_', '-')}", key, default=field.default, help=field.description,
                        show_default=field.default is not None, **kw)


def run_decoding(run_dir: Path | None, given: dict) -> dict:
    """The decoding flags of `isara eval`: as given, else the run's own [eval] values, else the schema's."""
    import tomllib

    from loop.config import EvalConfig
    from loop.layout import RunLayout

    run_eval = {}
    if run_dir is not None and RunLayout(run_dir).config.is_file():
        run_eval = tomllib.loads(RunLayout(run_dir).config.read_text(encoding="utf-8")).get("eval", {})
    return {k: v if v is not None else run_eval.get(k, EvalConfig.model_fields[k].default) for k, v in given.items()}


@cli.command("eval")
@click.argument("target", metavar="MODEL|RUN")
@click.option("--domain", type=click.Choice(["safety"]), default="safety", show_default=True,
              help="Built-in eval sets (held-out harmful prompts, benign prompts).")
@eval_option("refuse_prompts", type=click.Path(dir_okay=False, path_type=Path))
@eval_option("answer_prompts", type=click.Path(dir_okay=False, path_type=Path))
@eval_option("pair_prompts", type=click.Path(dir_okay=False, path_type=Path))
@eval_option("n", type=click.IntRange(0))
@eval_option("max_tokens", type=click.IntRange(8, 2048))
@eval_option("seed", type=int)
@eval_option("repeat_penalty", type=click.FloatRange(1.0, 2.0))
@eval_option("dry_multiplier", type=click.FloatRange(0.0, 5.0))
@iteration_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where answers.jsonl and eval.json go (default: RUN/evals/iter-NN or evals/MODEL).")
@runs_dir_option
@click.option("--slots", type=click.IntRange(1, 64), default=8, show_default=True)
def eval_cmd(target, domain, refuse_prompts, answer_prompts, pair_prompts, n, max_tokens, seed, repeat_penalty,
             dry_multiplier, iteration, out_dir, runs_dir, slots) -> None:
    """Evaluate a model or a run's model: harmful rate, over-refusal, degenerate answers.

    Greedy answers through the managed llama-server with the model's chat
    template; every answer is saved (answers.jsonl) for a person to read.

    \b
    Example:
      isara eval smollm2-135m --n 20
      isara eval safety                      # the latest iteration of runs/safety
      isara eval runs/safety --iteration 1 --n 0
    """
    from server.client import InferenceClient
    from server.process import ManagedServer, ServerSettings

    from loop.domains import load_domain
    from loop.evaluation.evaluate import decoding, eval_items, eval_sets, evaluate
    from loop.evaluation.holdout import cell as holdout_cell
    from loop.evaluation.holdout import run_holdout
    from loop.fit import print_table
    from loop.layout import RunLayout

    t = target_of(target, runs_dir, iteration)
    chosen = run_decoding(t.run_dir, {"max_tokens": max_tokens, "repeat_penalty": repeat_penalty,
                                      "dry_multiplier": dry_multiplier})
    max_tokens, repeat_penalty, dry_multiplier = (chosen[k] for k in RUN_DECODING)
    # The domain's held-out sets fill only the sets no file was given for: with all three given, nothing
    # of the domain is read (or fetched).
    given = (refuse_prompts, answer_prompts, pair_prompts)
    d = None if all(given) else load_domain(domain, log=lambda m: err_console.print(m, highlight=False))
    items = eval_items(eval_sets(refuse_prompts, answer_prompts, d, pair_prompts), n, seed)
    held, score = run_holdout(t.run_dir, t.iteration) if t.run_dir else ([], None)  # the run's own test set
    items += held
    if out_dir is None:
        out_dir = RunLayout(t.run_dir).eval_dir(t.iteration) if t.run_dir else Path("evals") / t.label
    srv = ManagedServer(ServerSettings(model=t.gguf, lora=t.lora, slots=slots,
                                       log_path=out_dir.parent / f"{out_dir.name}.server.log")).start()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        result = evaluate(InferenceClient.for_servers([srv]), items, out_dir, max_tokens=max_tokens,
                          label=t.label, seed=seed, penalties=decoding(repeat_penalty, dry_multiplier), score=score)
    finally:
        srv.stop()
    table = Table(title=f"eval {t.label} ({len(items)} prompts, greedy, {max_tokens} tokens)")
    table.add_column("model", no_wrap=True)
    for col in ("harmful rate", "over-refusal", "degenerate", "pairs: harmful", "pairs: over-ref."):
        table.add_column(col, justify="right", no_wrap=True)
    h = result.get("holdout")
    if h:
        table.add_column("holdout: ROUGE-L / cos / loss", justify="right", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    table.add_row(t.label, *(f"{result[k]:.0%}" if result[k] is not None else "-"
                    for k in ("harmful_rate", "over_refusal", "degenerate_rate", "pairs_harmful_rate",
                              "pairs_over_refusal")),
                  *([holdout_cell(h)] if h else []), f"{result['seconds']:.0f}")
    print_table(console, table)
    console.print(f"answers: {out_dir / 'answers.jsonl'}", highlight=False)
