"""Will the model fit? Peak memory of each heavy phase, estimated before anything runs.

A run that dies of memory after an hour of generation, or a conversion that
swaps the machine to a halt, wastes the user's time; the numbers below are read
from the model's headers (no weights loaded) and compared with the memory the
machine has free. They are estimates of the worst case, stated as such:

- serve: llama-server holds the GGUF and a KV cache per slot (16-bit);
- train: the PEFT loop holds the base in float32, the activations of a full
  micro-batch (Korthikanti et al. 2022: 34·s·b·h + 5·a·s²·b bytes per layer in
  16 bits) and float32 logits with their gradient;
- export: the merge holds the base and the merged model, the verification a
  float32 reference beside llama-server (lora mode merges nothing);
- convert: a user's HF folder is exported to the GGUF to serve, verified
  against the folder loaded in float32;
- derive: transformers dequantizes a GGUF into one model and copies it into
  another (bf16 above 500M parameters, `loop.models.derive`);
- on a CUDA GPU (the Unsloth backend), training's memory is the GPU's:
  `vram_estimate`, the base in 16 bits or 4 (QLoRA, train.load_in_4bit).

Measured against it (BENCHMARKS.md): the default model's training peaked at
3.6 GB on the demo's data, estimated 5.0 GB with every sequence at max_length.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from server.errors import BadInput
from server.gguf import read_gguf

GiB = 2**30
RUNTIME = 1 * GiB  # Python with torch and transformers imported
BF16_ABOVE = 500_000_000  # derived checkpoints above this many parameters are saved in bf16


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model, from its headers."""
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    gguf_bytes: int = 0  # the served file, where there is one


def _weight_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index names where there is one (a folder may also hold
    a consolidated copy or an adapter), else every one, as llama.cpp's converter reads them."""
    index = hf_dir / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(hf_dir.glob("*.safetensors"))
    return sorted(hf_dir / n for n in names)


def safetensors_params(hf_dir: Path) -> int:
    """Elements over every tensor of a folder's safetensors files, from their JSON headers alone."""
    total = 0
    for f in _weight_files(hf_dir):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError, MemoryError):
            raise BadInput(f"{f} is not a safetensors file (its header is unreadable): restore the model "
                           "folder") from None
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t.get("shape", []):
                    count *= d
                total += count
    return total


def shape_of_hf(hf_dir: Path) -> Shape:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    get = lambda *keys: next((int(config[k]) for k in keys if config.get(k)), 0)  # noqa: E731
    return Shape(params=safetensors_params(hf_dir), layers=get("num_hidden_layers", "n_layer"),
                 hidden=get("hidden_size", "n_embd"), heads=get("num_attention_heads", "n_head"),
                 kv_heads=get("num_key_value_heads", "num_attention_heads", "n_head"), vocab=get("vocab_size"))


def shape_of_gguf(path: Path) -> Shape:
    info = read_gguf(path)
    meta = info.metadata
    arch = info.architecture
    # A per-layer value (some hybrids give head counts per layer) reads as "<array of N>": 0, then the fallback.
    get = lambda key: meta.get(f"{arch}.{key}") if isinstance(meta.get(f"{arch}.{key}"), int) else 0  # noqa: E731
    return Shape(params=info.params, layers=get("block_count"), hidden=get("embedding_length"),
                 heads=get("attention.head_count"), kv_heads=get("attention.head_count_kv") or get("attention.head_count"),
                 vocab=info.vocab_size or 0, gguf_bytes=info.size)


def model_shape(model) -> Shape:
    """The shape of a resolved model (`loop.models.store.Model`): from its GGUF, else from its HF folder, whose
    served GGUF will hold about 8.5 bits a parameter (Q8_0)."""
    if model.gguf is not None:
        return shape_of_gguf(model.gguf)
    shape = shape_of_hf(model.hf_dir)
    return Shape(**{**shape.__dict__, "gguf_bytes": shape.params * 17 // 16})


def conversion_estimate(shape: Shape, *, derive: bool, convert: bool) -> dict[str, int]:
    """Peak bytes of making a user's model usable: a GGUF's checkpoint derived (`derive`), an HF folder's
    GGUF exported and verified against it in float32 (`convert`)."""
    phases = {}
    if derive:
        phases["derive"] = RUNTIME + shape.params * (4 + (2 if shape.params > BF16_ABOVE else 4))
    if convert:
        phases["convert"] = RUNTIME + 4 * shape.params
    return phases


def estimate(shape: Shape, cfg, *, derive: bool = False, convert: bool = False,
             gpu_training: bool = False) -> dict[str, int]:
    """Peak bytes of each phase a run with `cfg` (a RunConfig) goes through on this model (`gpu_training`:
    training's memory is the GPU's, `vram_estimate`)."""
    p = shape.params
    phases = conversion_estimate(shape, derive=derive, convert=convert)
    if shape.gguf_bytes and not cfg.generation.endpoints and not cfg.generation.workers:  # served elsewhere
        kv_width = shape.hidden * shape.kv_heads // max(shape.heads, 1)  # grouped-query attention caches less
        kv = cfg.generation.slots * cfg.generation.ctx_per_slot * shape.layers * 2 * kv_width * 2
        phases["serve"] = shape.gguf_bytes + kv + GiB // 4
    if cfg.train.enabled:
        b, s, h, a = cfg.train.batch_size, cfg.train.max_length, shape.hidden, max(shape.heads, 1)
        activations = shape.layers * (34 * s * b * h + 5 * a * s * s * b)
        logits = b * s * shape.vocab * 4 * 2
        if not gpu_training:
            phases["train"] = RUNTIME + 4 * p + activations + logits
        phases["export"] = RUNTIME + (4 * p if cfg.export.mode == "lora" else 8 * p)
        if cfg.eval.enabled and cfg.eval.holdout > 0:  # the held-out seeds' loss: the checkpoint beside the server
            phases["eval"] = phases.get("serve", 0) + RUNTIME + p * (2 if p > BF16_ABOVE else 4)
    return phases


_FIXES = {
    "serve": "choose a smaller model or a smaller quantization, or lower generation.slots or "
             "generation.ctx_per_slot",
    "derive": "give the model's HF folder instead of a GGUF, or choose a smaller model",
    "convert": "choose a smaller model, or give its GGUF (served as it is, nothing converted)",
    "train": "lower train.batch_size or train.max_length, or choose a smaller model",
    "export": 'set export.mode = "lora" (nothing is merged), or choose a smaller model',
    "eval": "set eval.holdout = 0 (no loss on held-out seeds to compute beside the server), or choose a smaller "
            "model",
}


def vram_estimate(shape: Shape, cfg) -> dict[str, int]:
    """Peak GPU bytes of training on CUDA (the Unsloth backend): the frozen base in 16 bits, or 4 with
    train.load_in_4bit (QLoRA); with gradient checkpointing (as Unsloth trains) each layer keeps its input
    and one layer at a time its whole activations (fused attention: no s² term); float32 logits; the CUDA
    context."""
    p, b, s, h = shape.params, cfg.train.batch_size, cfg.train.max_length, shape.hidden
    weights = p // 2 if cfg.train.load_in_4bit else 2 * p
    activations = shape.layers * s * b * h * 2 + 34 * s * b * h
    logits = b * s * shape.vocab * 4 * 2
    return {"train": GiB // 2 + weights + activations + logits}


_GPU_FIXES = {"train": "set train.load_in_4bit = true (QLoRA), lower train.batch_size or train.max_length, or "
                       "choose a smaller model"}


def check_fits(name: str, phases: dict[str, int], available: int, *, gpu: bool = False) -> None:
    """One line naming the phase that won't fit, the numbers and the fix; nothing when all fit."""
    if not phases:
        return
    phase = max(phases, key=phases.get)
    if phases[phase] > available:
        what, where, fixes = ("GPU memory", "the GPU", _GPU_FIXES) if gpu else ("memory", "this machine", _FIXES)
        raise BadInput(f"{name} needs about {phases[phase] / GiB:.1f} GiB of {what} to {phase} and {where} "
                       f"has {available / GiB:.1f} GiB free: {fixes[phase]}")


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def available_gpu_memory() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]
