"""Mid-epoch checkpoints of the PEFT loop: what a killed training needs to go on where it stopped.

Every `train.checkpoint_every` optimizer steps the loop writes, whole or not at all (a temporary
folder renamed into place), into the phase's `checkpoint/` folder:

    state.safetensors   the LoRA weights, AdamW's moments and step counts, torch's RNG (dropout masks)
    progress.json       step, micro-batch, tokens and losses so far, the batches left in this pass over
                        the data (by example position), Python's RNG (the next passes' order), AdamW's
                        settings, the scheduler, and a fingerprint of the examples and the settings

Nothing in it is unpickled on the way back (safetensors and JSON only), as for every file isara reads.

A training that finds a checkpoint with its own fingerprint restores all of it and continues from the
next micro-batch, so the adapter it ends with is the one an uninterrupted run ends with (within float
rounding); one with another fingerprint (other samples, other settings) ignores it and starts over. At
most `checkpoint_every` steps are lost to a kill. The folder is removed once the adapter is saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from loop.config import TrainConfig
from loop.files import atomic_dir

# Settings that do not change what is computed: a checkpoint made under other values still fits.
_NEUTRAL = {"checkpoint_every", "backend", "enabled", "report_to", "compile"}  # compile: rounding only


def fingerprint(examples: list[dict], cfg: TrainConfig, previous_adapter: Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=_NEUTRAL), sort_keys=True).encode())
    h.update(str(previous_adapter).encode())
    for e in examples:
        h.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return h.hexdigest()


def checkpoint_step(folder: Path) -> int | None:
    """The optimizer step a whole checkpoint in `folder` was saved at, or None (`isara status` shows it)."""
    try:
        if (folder / "state.safetensors").is_file():
            return int(json.loads((folder / "progress.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def save_checkpoint(folder: Path, *, model, opt, sched, progress: dict) -> None:
    """Tensors into safetensors, everything else into JSON: nothing a later load would have to unpickle."""
    from safetensors.torch import save_file

    tensors, opt_state = _tensors_of(model, opt)
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({
            **progress, "optimizer": opt_state, "param_groups": opt.state_dict()["param_groups"],
            "scheduler": sched.state_dict()}), encoding="utf-8")


def load_checkpoint(folder: Path | None, expected: str, *, model, opt, sched) -> dict | None:
    """Restore a checkpoint of this very training into model, optimizer and scheduler; its progress, or None."""
    import torch
    from safetensors.torch import load_file

    if folder is None or not (folder / "progress.json").is_file() or not (folder / "state.safetensors").is_file():
        return None
    progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
    if progress.get("fingerprint") != expected:
        return None
    tensors = load_file(str(folder / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if p.requires_grad:
                p.copy_(tensors[f"param/{name}"])
    state = {int(i): {key: tensors[f"adamw/{i}/{key}"] for key in keys} for i, keys in progress["optimizer"].items()}
    opt.load_state_dict({"state": state, "param_groups": progress["param_groups"]})
    sched.load_state_dict(progress["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    return progress


def _tensors_of(model, opt) -> tuple[dict, dict]:
    """The LoRA weights, AdamW's per-parameter tensors and torch's RNG, as one flat dict of tensors; and, for
    JSON, which AdamW tensors each parameter has."""
    import torch

    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt_state = {}
    for i, st in opt.state_dict()["state"].items():
        opt_state[str(i)] = sorted(st)
        for key, value in st.items():
            tensors[f"adamw/{i}/{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu()
    tensors["rng/torch"] = torch.get_rng_state()
    return tensors, opt_state


def python_rng_state(rng) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def remove_checkpoint(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
