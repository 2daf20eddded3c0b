"""What every `isara` command shares: the group, its error handling, the consoles, the common options.

Exit codes: 0 ok, 1 the job failed (a server that would not start, a tool that
failed), 2 bad input (the message names the problem and the fix). Tracebacks
only with `--debug`.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console

from server.client import RequestRejected
from server.errors import BadInput, ServerCrashed, ServerStartError, ServerUnavailable, ToolFailed

from loop import __version__
from loop.files import disk_problem

console = Console()
err_console = Console(stderr=True)

# Options several commands share, defined once.
runs_dir_option = click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
                               show_default=True, help="Where runs live (a RUN may be a name in it).")
iteration_option = click.option("--iteration", type=click.IntRange(1), default=None,
                                help="A run's iteration (default: the latest exported one).")


# `isara serve` and `isara worker`: the server settings they share, each a flag made from its field of
# ServerSettings (server/process.py) as `isara eval`'s flags are made from the eval schema. A flag is named
# for its field unless named here.
SERVER_KEYS = ("host", "port", "api_key", "slots", "ctx_per_slot", "threads")
SERVER_FLAGS = {"ctx_per_slot": "--ctx"}


def server_options(*keys: str, **overrides: dict):
    """Flags for the fields `keys` of the server's settings, in that order: type, bounds, default and help from
    the settings; `overrides[key]`: a command's own default or help."""
    def apply(f):
        for key in reversed(keys):  # click lists a command's options in the order their decorators are read
            f = _server_option(key, **overrides.get(key, {}))(f)
        return f
    return apply


def _server_option(key: str, **overrides):
    import typing

    import annotated_types

    from server.process import ServerSettings

    field = ServerSettings.model_fields[key]
    kind = next(a for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None))
    if typing.get_origin(field.annotation) is typing.Literal:
        kind = click.Choice(typing.get_args(field.annotation))
    elif kind is int:
        low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
        kind = click.IntRange(low, high)
    options = {"type": kind, "default": field.default, "help": field.description, **overrides}
    options.setdefault("show_default", options["default"] is not None)
    if key == "api_key":
        options["envvar"] = "ISARA_API_KEY"
    return click.option(SERVER_FLAGS.get(key, f"--{key.replace('_', '-')}"), key, **options)


def target_of(spec: str, runs_dir: Path, iteration: int | None):
    """MODEL|RUN resolved (loop/targets.py); says so when a run's held-out seeds chose the iteration."""
    from loop.targets import resolve_target

    t = resolve_target(spec, runs_dir, iteration)
    if t.note:  # on stdout, as the command's other output: stderr is for errors, one line each
        console.print(t.note, highlight=False)
    return t


class IsaraGroup(click.Group):
    """Turns known errors into one line and an exit code; `--debug` shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (BadInput, ServerStartError, ToolFailed, ServerUnavailable, ServerCrashed, RequestRejected,
                OSError) as e:
            if debugging(ctx):
                raise
            disk = disk_problem(e)
            if isinstance(e, OSError) and disk is None:
                raise  # not the disk: a fault, with its traceback
            code = 2 if isinstance(e, BadInput) or disk else 1
            text = disk or (str(e) if code == 1 else str(e).splitlines()[0])
            err_console.print(f"[bold red]isara: error:[/] {text}", highlight=False, soft_wrap=True)
            ctx.exit(code)


def debugging(ctx: click.Context | None = None) -> bool:
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
