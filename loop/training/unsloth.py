"""The Unsloth backend: FastLanguageModel, its LoRA, and trl's SFT trainer (CUDA).

Same inputs, outputs and data as the PEFT loop (`loop/training/common.py`): the chat
template, loss on the answer only, length grouping, warmup then linear decay,
a fixed seed. Unsloth is never asked to build or download llama.cpp: isara
merges and converts with its own toolchain, and the environment below keeps
Unsloth's GGUF helpers offline should anything call them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from server.tempfiles import temp_name
from server.toolchain import find_toolchain

from loop.config import TrainConfig
from loop.data import Sample
from loop.training.common import (IGNORE, TrainResult, encode_examples, lora_targets, peak_rss_mb, save_adapter_atomic,
                               step_plan)


def _offline_unsloth_env() -> None:
    os.environ.setdefault("UNSLOTH_LLAMA_CPP_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_AUTO_INSTALL", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tc = find_toolchain()
    if tc is not None:
        os.environ.setdefault("UNSLOTH_LLAMA_CPP_PATH", str(tc.root))


def train_unsloth(hf_dir: Path, samples: list[Sample], cfg: TrainConfig, out: Path, *,
                  previous_adapter: Path | None = None, on_step=None) -> TrainResult:
    _offline_unsloth_env()
    import unsloth  # noqa: F401  (patches transformers/trl first, as Unsloth requires)
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import DataCollatorForSeq2Seq, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(hf_dir), max_seq_length=cfg.max_length, dtype=None, load_in_4bit=cfg.load_in_4bit,
        local_files_only=True, trust_remote_code=False)
    if previous_adapter is not None:
        model = PeftModel.from_pretrained(model, previous_adapter, is_trainable=True)
    else:
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
            target_modules=lora_targets(model, cfg.target_modules), random_state=cfg.seed,
            use_gradient_checkpointing="unsloth")
    rows = encode_examples(tokenizer, samples, cfg.max_length)
    dataset = Dataset.from_list(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)

    class _Steps(TrainerCallback):
        losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 5))
                if on_step:
                    on_step({"step": state.global_step, "steps": state.max_steps, "loss": float(logs["loss"]),
                             "lr": logs.get("learning_rate"), "tokens": None,
                             "seconds": round(time.perf_counter() - started, 2)})

    steps_cb = _Steps()
    steps_cb.losses = []
    work = temp_name(out.with_name(f"{out.name}.trainer"))  # a crash leaves it to the stale-temp sweep
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    plan = step_plan(len(rows), cfg)
    args = SFTConfig(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        warmup_steps=plan.warmup, lr_scheduler_type="linear", seed=cfg.seed, logging_steps=1,
        report_to=[], save_strategy="no", train_sampling_strategy="group_by_length", max_length=cfg.max_length,
        bf16=bf16, fp16=torch.cuda.is_available() and not bf16, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
                         callbacks=[steps_cb])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    save_adapter_atomic(model, hf_dir, out)
    shutil.rmtree(work, ignore_errors=True)
    vram = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return TrainResult(adapter_dir=out, backend="unsloth", steps=int(result.global_step), losses=steps_cb.losses,
                       tokens=int(tokens * cfg.epochs), seconds=seconds, peak_rss_mb=peak_rss_mb(),
                       peak_vram_mb=vram)
