"""Several draws of one configuration: `isara run CONFIG --draws N`.

Where a run lands depends on its generated data's luck (EXPERIMENTS.md: one
configuration's draws scatter by tens of points), so a claim about a
configuration is a mean and a range over generation seeds, never one run. Each
draw is a whole run (NAME-draw1..N, generation seeds s..s+N-1, resumable on its
own); the baselines don't depend on the generation seed, so the first draw
computes them and the others are given its files (loop/evaluation/frontier.py,
`copy_baselines`). The summary, NAME-draws.md and NAME-draws.json, gives each
draw's model, the mean and range of every rate, and the baselines beside them;
the JSON is what `eval.recorded_draws` reads to place a later run among them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loop.evaluation.frontier import RATES, comparison, configuration, copy_baselines, draw_row, fingerprint, \
    mean_of_two, summary
from loop.files import write_json_atomic, write_text_atomic
from loop.layout import RunLayout

NAMES = {"harmful_rate": "harmful", "over_refusal": "over-refusal", "pairs_over_refusal": "pairs: everyday refused",
         "pairs_harmful_rate": "pairs: harmful", "degenerate_rate": "degenerate"}


def run_draws(config: Path | None, name: str | None, overrides: list[str], n: int,
              run_one: Callable, log=print) -> Path:
    """Run (or resume) the N draws in turn; returns the summary's markdown file."""
    from loop.run import prepare

    cfg0, _ = prepare(config, overrides, name)
    stem, seed0 = cfg0.name, cfg0.generation.seed
    dirs = []
    for k in range(1, n + 1):
        cfg, run_dir = prepare(config, [*overrides, f"generation.seed={seed0 + k - 1}"], f"{stem}-draw{k}")
        if dirs:
            run_dir.mkdir(parents=True, exist_ok=True)
            given = copy_baselines(dirs[0], run_dir)
            if given:
                log(f"draw {k}/{n}: {len(given)} baseline phases from {dirs[0].name} (they don't depend on the "
                    "generation seed)")
        log(f"draw {k}/{n}: {run_dir.name}, generation.seed = {seed0 + k - 1}")
        run_one(cfg, run_dir)
        dirs.append(run_dir)
    return write_summary(dirs, cfg0.runs_dir.resolve() / f"{stem}-draws")


def write_summary(dirs: list[Path], stem: Path) -> Path:
    """stem.json (recorded draws: what eval.recorded_draws reads) and stem.md (the same, for people)."""
    from loop.evaluation.report import collect

    rows = [r for d in dirs if (r := draw_row(d, collect(d))) is not None]
    baselines = {r["name"]: {k: r["eval"].get(k) for k in RATES}
                 for r in collect(dirs[0]) if r["kind"] == "baseline" and r.get("eval")}
    config = RunLayout(dirs[0]).config
    data = {"fingerprint": fingerprint(config), "draws": rows, "summary": summary(rows), "baselines": baselines,
            "configuration": configuration(config)}
    write_json_atomic(stem.with_suffix(".json"), data)
    md = stem.with_suffix(".md")
    write_text_atomic(md, summary_markdown(data, stem.name))
    return md


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def summary_markdown(data: dict, title: str) -> str:
    rows, s, baselines = data["draws"], data["summary"], data["baselines"]
    cols = [k for k in RATES if s.get(k)]
    out = [f"# {title}: {len(rows)} draws of one configuration (fingerprint {data['fingerprint']})\n",
           "Each draw's model is the iteration its held-out seeds chose. Rates in percent; lower is better.\n",
           "| draw | generation seed | iteration | " + " | ".join(NAMES[k] for k in cols) + " | mean of harmful "
           "and over-refusal |", "|" + "---|" * (len(cols) + 4)]
    for r in rows:
        out.append(f"| {r['run']} | {r['generation_seed']} | {r['iteration']} | "
                   + " | ".join(_pct(r.get(k)) for k in cols) + f" | {_pct(mean_of_two(r))} |")
    if rows:
        out.append("| **mean (range)** | | | " + " | ".join(
            f"**{s[k]['mean']:.0%}** ({s[k]['min']:.0%}-{s[k]['max']:.0%})" for k in cols)
            + (f" | **{s['mean_of_two']['mean']:.1%}** ({s['mean_of_two']['min']:.1%}-{s['mean_of_two']['max']:.1%}) |"
               if s.get("mean_of_two") else " | - |"))
    for name, ev in baselines.items():
        out.append(f"| baseline: {name} | | | " + " | ".join(_pct(ev.get(k)) for k in cols)
                   + f" | {_pct(mean_of_two(ev))} |")
    out.append("")
    out.append(comparison(data))
    return "\n".join(out) + "\n"
