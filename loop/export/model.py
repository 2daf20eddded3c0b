"""`isara export RUN --to DIR`: take a run's model out of the run, in the format a tool wants.

- gguf: the served GGUF (and the LoRA GGUF in lora mode) with an Ollama
  `Modelfile` next to it (`ollama create NAME -f DIR/Modelfile`) whose template
  renders conversations as the model's own chat template does (`loop.export.ollama`);
- hf:   the merged model as a Hugging Face folder (safetensors, tokenizer, chat template);
- lora: the PEFT adapter (safetensors) and its GGUF, to apply on the base model.

Every output is assembled in a temporary folder and moved into place whole; an
existing non-empty DIR is refused rather than mixed with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from server.errors import BadInput
from server.gguf import convert_lora_to_gguf

from loop.export.ollama import modelfile
from loop.files import atomic_dir, write_json_atomic, write_text_atomic
from loop.layout import RunLayout
from loop.models.local import train_gguf_file
from loop.models.store import prepared_base, resolve_model

FORMATS = ("gguf", "hf", "lora")

def _base_hf(run_dir: Path) -> Path:
    import tomllib

    prepared = prepared_base(RunLayout(run_dir).base_model)
    if prepared is not None and prepared.hf_dir is not None and prepared.hf_dir.is_dir():
        return prepared.hf_dir  # the checkpoint the run trained on, its chat template written in
    cfg = tomllib.loads(RunLayout(run_dir).config.read_text(encoding="utf-8"))
    model = resolve_model(cfg.get("model", {}).get("base", "smollm2-135m"))
    if model.hf_dir is None and model.entry is not None:
        raise BadInput(f"the run's base model {model.name} was pulled without its HF checkpoint: "
                       f"run `isara models pull {model.name}`")
    return train_gguf_file(model).hf_dir  # a GGUF base: the checkpoint the run trained on (derived once)


def export_run(run_dir: Path, iteration: int, to: Path, fmt: str) -> list[Path]:
    """Iteration `iteration` of the run (an exported one) into the new folder `to`, as `fmt`."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise BadInput(f"{to} exists and is not an empty folder: choose a new --to folder")
    layout = RunLayout(run_dir)
    it_dir = layout.iteration(iteration)
    export = json.loads(layout.export_info(iteration).read_text(encoding="utf-8"))
    gguf, lora = layout.served(export)
    to.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(to) as tmp:
        if fmt == "gguf":
            shutil.copy2(gguf, tmp / "model.gguf")
            adapter = None
            if lora:
                adapter = "adapter.gguf"
                shutil.copy2(lora[0], tmp / adapter)
            write_text_atomic(tmp / "Modelfile", modelfile(gguf, "model.gguf", adapter))
        elif fmt == "hf":
            merged = it_dir / "merged"
            if (merged / "config.json").is_file():
                shutil.copytree(merged, tmp, dirs_exist_ok=True)
            else:  # lora mode keeps no merged folder: merge now
                from loop.models.convert import load_adapted, save_merged

                base_hf = _base_hf(run_dir)
                model, _ = load_adapted(base_hf, it_dir / "adapter")
                save_merged(model, base_hf, tmp / "merged")
                for p in (tmp / "merged").iterdir():
                    p.rename(tmp / p.name)
                (tmp / "merged").rmdir()
        else:
            for p in (it_dir / "adapter").iterdir():
                if p.is_file() and not p.name.startswith("."):
                    shutil.copy2(p, tmp / p.name)
            lora_gguf = it_dir / "adapter.gguf"
            if lora_gguf.is_file():
                shutil.copy2(lora_gguf, tmp / "adapter.gguf")
            else:
                convert_lora_to_gguf(it_dir / "adapter", _base_hf(run_dir), tmp / "adapter.gguf")
        write_json_atomic(tmp / "isara-export.json", {
            "run": run_dir.name, "iteration": iteration, "format": fmt, "mode": export.get("mode"),
            "quant": export.get("quant"), "verification": export.get("verification")})
    return sorted(to.iterdir())
