"""Mid-epoch checkpoints of the PEFT loop: what a killed training needs to go on where it stopped.

Every `train.checkpoint_every` optimizer steps the loop writes, whole or not at all (a temporary
folder renamed into place), into the phase's `checkpoint/` folder:

    state.pt        the LoRA weights, AdamW's moments, the scheduler, torch's RNG (dropout masks);
                    tensors and plain values only, read back with `torch.load(weights_only=True)`
    progress.json   step, micro-batch, tokens and losses so far, the batches left in this pass over
                    the data (by example position), Python's RNG (the next passes' order), and a
                    fingerprint of the examples and the settings

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
_NEUTRAL = {"checkpoint_every", "backend", "enabled"}


def fingerprint(examples: list[dict], cfg: TrainConfig, previous_adapter: Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(cfg.model_dump(mode="json", exclude=_NEUTRAL), sort_keys=True).encode())
    h.update(str(previous_adapter).encode())
    for e in examples:
        h.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return h.hexdigest()


def save_checkpoint(folder: Path, *, model, opt, sched, progress: dict) -> None:
    import torch

    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_dir(folder) as tmp:
        torch.save({"params": trainable, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps(progress), encoding="utf-8")


def load_checkpoint(folder: Path | None, expected: str, *, model, opt, sched) -> dict | None:
    """Restore a checkpoint of this very training into model, optimizer and scheduler; its progress, or None."""
    import torch

    if folder is None or not (folder / "progress.json").is_file() or not (folder / "state.pt").is_file():
        return None
    progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
    if progress.get("fingerprint") != expected:
        return None
    state = torch.load(folder / "state.pt", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return progress


def python_rng_state(rng) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def remove_checkpoint(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
