"""`isara run` (one run, or its draws) and `isara status`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from server.errors import BadInput, ServerCrashed

from loop.cli.common import cli, console, debugging, err_console, runs_dir_option
from loop.files import disk_problem


@cli.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Run name (folder under runs_dir); default: the config file's stem.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set iterations=1 --set generation.samples=8.")
@click.option("--plain", "output", flag_value="plain", help="Progress as plain lines (the default off a terminal).")
@click.option("--json", "output", flag_value="json", help="Stream the events as JSON lines, the results last.")
@click.option("--quiet", "output", flag_value="quiet", help="Show only the result.")
@click.option("--draws", type=click.IntRange(1, 20), default=None,
              help="Run the configuration N times, generation seeds 0..N-1, as runs NAME-draw1..N; the baselines "
                   "(which don't depend on that seed) are computed once; then NAME-draws.md and .json give the "
                   "mean and range of each rate over the draws.")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where runs live (the same as --set runs_dir=DIR). Default: the config's runs_dir, else runs.")
def run_cmd(config: Path, name, overrides, output, draws, runs_dir) -> None:
    """Start a run from CONFIG, or resume it (CONFIG may also be a run folder).

    On a terminal a live dashboard shows the run; elsewhere (pipes, CI, --plain)
    the same progress comes as plain lines. Running the same command again
    resumes: finished phases are skipped, an interrupted generation continues
    from the samples already on disk.

    \b
    Example:
      isara run examples/quick.toml
      isara run examples/quick.toml --set iterations=1 --set generation.samples=8
      isara run runs/quick            # resume
    """
    from loop.run import execute, prepare

    overrides = [*overrides, *([f"runs_dir={json.dumps(str(runs_dir))}"] if runs_dir is not None else [])]
    if draws is not None:
        return _run_draws(config, name, overrides, output, draws)
    cfg, run_dir = prepare(config, overrides, name)
    output = output or ("live" if sys.stdout.isatty() else "plain")
    try:
        if output == "live":
            from loop.dashboard import Dashboard

            with Dashboard(console) as dash:
                execute(cfg, run_dir, output=output, sink=dash.update)
        else:
            execute(cfg, run_dir, output=output)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; accepted samples are kept. Resume with: isara run {run_dir}",
                          highlight=False)
        sys.exit(130)
    except (ServerCrashed, OSError) as e:
        resume = f"isara run {run_dir}"
        problem = disk_problem(e, resume)
        if (isinstance(e, OSError) and problem is None) or debugging():
            raise
        # The run stopped cleanly with everything it kept: say what happened and how to pick it up again.
        text = problem or f"{e}; resume with: {resume}"
        err_console.print(f"[bold red]isara: error:[/] {text}", highlight=False, soft_wrap=True)
        sys.exit(2 if problem else 1)
    from loop.evaluation.report import collect, terminal_table
    from loop.fit import print_table

    if output == "json":  # stdout stays JSON lines: the results are the last one, not a drawn table
        print(json.dumps({"event": "results", "report": str(run_dir / "report.md"), "rows": collect(run_dir)},
                         ensure_ascii=False, default=str), flush=True)
        return
    print_table(console, terminal_table(collect(run_dir)))
    console.print(f"report: {run_dir / 'report.md'}", highlight=False)


def _run_draws(config: Path, name, overrides: list[str], output, n: int) -> None:
    """`isara run CONFIG --draws N`: each draw a whole run (resumable alone), the baselines shared."""
    from loop.draws import run_draws

    if config is not None and Path(config).is_dir():
        raise BadInput(f"--draws takes a config file, not a run folder ({config}): resume a draw with "
                       f"`isara run CONFIG --draws {n}` again, or one draw with `isara run FOLDER`")

    def one(cfg, run_dir) -> None:
        from loop.run import execute

        if (output or ("live" if sys.stdout.isatty() else "plain")) == "live":
            from loop.dashboard import Dashboard

            with Dashboard(console) as dash:
                execute(cfg, run_dir, output="live", sink=dash.update)
        else:
            execute(cfg, run_dir, output=output or "plain")

    summary_md = run_draws(config, name, overrides, n, one, log=lambda m: console.print(m, highlight=False))
    console.print(summary_md.read_text(encoding="utf-8"), highlight=False, markup=False)


@cli.command()
@click.argument("run", required=False, type=click.Path(path_type=Path))
@runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run, runs_dir, as_json) -> None:
    """Where each run stands (status, iterations, accepted samples, loss, exported model, eval), from its files.

    \b
    Example:
      isara status
      isara status runs/quick
    """
    from loop.evaluation.holdout import cell as holdout_cell
    from loop.fit import print_table
    from loop.layout import find_runs
    from loop.status import run_summary, status_text
    from loop.targets import run_folder

    if run is not None:
        folder = run_folder(str(run), runs_dir)
        if folder is None:
            known = ", ".join(d.name for d in find_runs(runs_dir)) or "none"
            raise BadInput(f"no run at {run}: give a run folder or a name in {runs_dir} (known: {known})")
        folders = [folder]
    else:
        folders = find_runs(runs_dir)
    summaries = [run_summary(f) for f in folders]
    if as_json:
        console.print_json(json.dumps(summaries))
        return
    if not summaries:
        console.print(f"no runs in {runs_dir}", highlight=False)
    for s in summaries:
        table = Table(title=f"{s['name']}: {status_text(s)} ({s['folder']})")
        held = any(r.get("holdout") for r in s["iterations"])  # a run with held-out seeds: their scores too
        for col in ("iter", "phases done", "accepted", "rate", "last loss", "model", "verified", "harmful",
                    "over-ref.", *(["holdout: ROUGE-L / cos / loss"] if held else [])):
            table.add_column(col)
        pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        for r in s["iterations"]:
            done = r["phases_done"] + ([f"checkpoint {r['checkpoint']}"] if r.get("checkpoint") else [])
            table.add_row(r["iteration"], ", ".join(done) or "-",
                          f"{r['accepted']}/{r['target'] or '?'}", pct(r["acceptance_rate"]),
                          str(r["last_loss"] or "-"), r["model"] or "-",
                          {True: "yes", False: "NO", None: "-"}[r["verified"]], pct(r["harmful_rate"]),
                          pct(r["over_refusal"]), *([holdout_cell(r.get("holdout"))] if held else []))
        print_table(console, table)
        if s["status"] in ("interrupted", "stopped"):
            console.print(f"resume with: isara run {s['folder']}", highlight=False)
