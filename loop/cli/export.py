"""`isara export`: a run's model or its data, out of the run."""

from __future__ import annotations

from pathlib import Path

import click

from server.errors import BadInput

from loop.cli.common import cli, console, iteration_option, runs_dir_option, target_of


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
