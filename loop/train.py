"""LoRA supervised fine-tuning, behind one interface with two backends.

- `peft`: a plain PyTorch + PEFT loop (no trl): CPU, and CUDA without Unsloth.
- `unsloth`: Unsloth's FastLanguageModel and its SFT trainer (CUDA; optional
  extra `isara[unsloth]`), see `loop/train_unsloth.py`.

Both train on the model's own chat template (a user turn with the question, an
assistant turn with the answer), with the loss on the answer tokens only.
Inputs: an HF folder (safetensors), the samples, the TrainConfig; output: a
PEFT adapter folder, written atomically (a temporary folder, then a rename).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from server.toolchain import cuda_available

from loop.config import TrainConfig
from loop.data import Sample
from loop.files import atomic_dir

IGNORE = -100


@dataclass
class TrainResult:
    adapter_dir: Path
    backend: str
    steps: int
    losses: list[float]
    tokens: int  # tokens seen (all, padding excluded)
    seconds: float
    peak_rss_mb: float
    peak_vram_mb: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"backend": self.backend, "steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "tokens": self.tokens,
                "seconds": round(self.seconds, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "peak_rss_mb": round(self.peak_rss_mb), "peak_vram_mb": self.peak_vram_mb and round(self.peak_vram_mb)}


def choose_backend(requested: str) -> str:
    import importlib.util

    from server.errors import BadInput

    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if has_unsloth and cuda_available() else "peft"
    if requested == "unsloth" and not has_unsloth:
        raise BadInput("train.backend = unsloth but Unsloth is not installed: pip install -e '.[unsloth]' "
                       "(CUDA machines), or set train.backend = peft")
    return requested


# --- data ---------------------------------------------------------------------

def encode_example(tokenizer, question: str, answer: str, max_length: int) -> dict:
    """Token ids of the chat-formatted pair, with labels on the answer only.

    The prompt part is the template rendered up to the assistant's turn
    (add_generation_prompt); everything after it (the answer and the template's
    end-of-turn, so the model learns to stop) carries the loss. Offsets of the
    full text decide the boundary, so a BPE merge across it can't shift it.
    """
    user = [{"role": "user", "content": question}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    # add_special_tokens: a BOS where the tokenizer adds one, as the server does; its offset (0, 0) keeps it
    # out of the loss.
    enc = tokenizer(full_text, add_special_tokens=True, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if start >= len(prompt_text) else IGNORE for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def length_bucketed_batches(examples: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle, then sort by length inside windows of 16 batches: little padding, still random order."""
    order = examples[:]
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda e: len(e["input_ids"]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(batch: list[dict], pad_id: int):
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "vocab.*", "merges.txt")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The base's tokenizer files, verbatim. Re-saving a loaded tokenizer can drop files
    (tokenizer.model), and the converter then reads another vocabulary than the one trained on."""
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def _save_adapter_atomic(model, base_hf: Path, out: Path) -> Path:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(base_hf, tmp)
    return out


# --- the PEFT loop --------------------------------------------------------------

def train_peft(hf_dir: Path, samples: list[Sample], cfg: TrainConfig, out: Path, *,
               previous_adapter: Path | None = None, on_step=None) -> TrainResult:
    """Plain PyTorch + PEFT: AdamW, linear warmup then linear decay, grad accumulation, fixed seed."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = "cuda" if cuda_available() and torch.cuda.is_available() else "cpu"
    # fp32 on CPU (bf16 matmuls are slow there and lose precision); bf16 on GPUs that have it.
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False).to(device)
    model.config.use_cache = False
    if previous_adapter is not None:
        model = PeftModel.from_pretrained(model, previous_adapter, is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    examples = [encode_example(tokenizer, s.prompt, s.response, cfg.max_length) for s in samples]
    examples = [e for e in examples if any(label != IGNORE for label in e["labels"])]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_micro = max(1, math.ceil(batches_per_epoch * cfg.epochs))
    total_steps = max(1, math.ceil(total_micro / cfg.grad_accum))
    warmup = int(total_steps * cfg.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses, tokens, step, micro = [], 0, 0, 0
    started = time.perf_counter()
    queue: list[list[dict]] = []
    while micro < total_micro:
        if not queue:
            queue = length_bucketed_batches(examples, cfg.batch_size, rng)
        batch = queue.pop()
        ids, labels, mask = (t.to(device) for t in collate(batch, pad_id))
        out_ = model(input_ids=ids, attention_mask=mask, labels=labels)
        (out_.loss / cfg.grad_accum).backward()
        tokens += int(mask.sum())
        micro += 1
        acc_loss = float(out_.loss.detach())
        if micro % cfg.grad_accum == 0 or micro == total_micro:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(acc_loss, 5))
            if on_step:
                on_step({"step": step, "steps": total_steps, "loss": acc_loss, "lr": sched.get_last_lr()[0],
                         "tokens": tokens, "seconds": round(time.perf_counter() - started, 2)})
    seconds = time.perf_counter() - started
    model.eval()
    _save_adapter_atomic(model, hf_dir, out)
    vram = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return TrainResult(adapter_dir=out, backend="peft", steps=step, losses=losses, tokens=tokens, seconds=seconds,
                       peak_rss_mb=_peak_rss_mb(), peak_vram_mb=vram)


def train(hf_dir: Path, samples: list[Sample], cfg: TrainConfig, out: Path, *,
          previous_adapter: Path | None = None, on_step=None) -> TrainResult:
    backend = choose_backend(cfg.backend)
    if backend == "unsloth":
        from loop.train_unsloth import train_unsloth

        return train_unsloth(hf_dir, samples, cfg, out, previous_adapter=previous_adapter, on_step=on_step)
    return train_peft(hf_dir, samples, cfg, out, previous_adapter=previous_adapter, on_step=on_step)
