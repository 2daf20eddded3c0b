"""LoRA supervised fine-tuning: one entry point, the backend chosen here.

- `peft`: a plain PyTorch + PEFT loop (`loop/training/peft.py`): CPU, and CUDA without Unsloth.
- `unsloth`: Unsloth's FastLanguageModel and trl's SFT trainer (`loop/training/unsloth.py`; CUDA,
  optional extra `isara[unsloth]`).

Both train on the model's own chat template with the loss on the answer tokens
only (`loop/training/common.py`). Inputs: an HF folder (safetensors), the samples,
the TrainConfig; output: a PEFT adapter folder, written atomically.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from server.errors import BadInput
from server.toolchain import cuda_available

from loop.config import TrainConfig
from loop.data import Sample
from loop.training.common import TrainResult


def choose_backend(requested: str) -> str:
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if has_unsloth and cuda_available() else "peft"
    if requested == "unsloth" and not has_unsloth:
        raise BadInput("train.backend = unsloth but Unsloth is not installed: pip install -e '.[unsloth]' "
                       "(CUDA machines), or set train.backend = peft")
    return requested


QLORA_NEEDS_CUDA = ("train.load_in_4bit needs the Unsloth backend on a CUDA GPU (QLoRA), and this run trains with "
                    "the PEFT loop: set train.load_in_4bit = false, or run on a CUDA machine with the [unsloth] extra")


def check_backend(cfg: TrainConfig) -> str:
    """The backend a run trains with, checked before any work: QLoRA needs Unsloth on CUDA."""
    backend = choose_backend(cfg.backend)
    if cfg.load_in_4bit and backend != "unsloth":
        raise BadInput(QLORA_NEEDS_CUDA)
    return backend


def train(hf_dir: Path, samples: list[Sample], cfg: TrainConfig, out: Path, *,
          previous_adapter: Path | None = None, on_step=None, checkpoint_dir: Path | None = None) -> TrainResult:
    """`checkpoint_dir`: where the PEFT loop keeps its mid-epoch checkpoints (the Unsloth backend has none)."""
    if check_backend(cfg) == "unsloth":
        from loop.training.unsloth import train_unsloth

        return train_unsloth(hf_dir, samples, cfg, out, previous_adapter=previous_adapter, on_step=on_step)
    from loop.training.peft import train_peft

    return train_peft(hf_dir, samples, cfg, out, previous_adapter=previous_adapter, on_step=on_step,
                      checkpoint_dir=checkpoint_dir)
