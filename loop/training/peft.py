"""The PEFT backend: a plain PyTorch + PEFT loop (no trl), for CPUs and for GPUs without Unsloth.

AdamW, linear warmup then linear decay, gradient accumulation, length-bucketed
batches padded to a multiple of 8 tokens (fewer matmul shapes for oneDNN to
compile), a fixed seed. On a CPU the forward and backward run under bf16 autocast
where the hardware has bf16 matmuls (`train.precision`), with the frozen weights
held in bf16 and the LoRA, norms and AdamW in fp32; the loss curve stays within a
few hundredths of fp32's. On GPUs with bf16 the whole model is bf16. The output
head runs only where a label is (`answer_loss`), attention is eager on CPU, and
the default LoRA has no dropout: together 1.9x the tokens/s of the loop before
them on the demo's set (BENCHMARKS.md). A training big enough to pay for it runs
its decoder layers torch.compile'd (`train.compile`), falling back to eager, with
the reason in its result, where the compile fails. Data, step plan and the
adapter on disk come from `loop/training/common.py`, shared with the Unsloth backend.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from server.toolchain import cuda_available

from loop.config import TrainConfig
from loop.data import Sample
from loop.training.checkpoint import (fingerprint, load_checkpoint, python_rng_state, remove_checkpoint,
                                   save_checkpoint, set_python_rng_state)
from loop.training.common import (TrainResult, answer_cross_entropy, answer_loss, autocast_bf16, collate,
                               compile_decoder_layers, compiled_cross_entropy, encode_examples, frozen_linears_to_bf16,
                               length_bucketed_batches, lora_targets, lr_factor, peak_rss_mb, save_adapter_atomic,
                               step_plan, uncompile, use_compile, without_a_batch_of_one)


def train_peft(hf_dir: Path, samples: list[Sample], cfg: TrainConfig, out: Path, *,
               previous_adapter: Path | None = None, on_step=None, checkpoint_dir: Path | None = None) -> TrainResult:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = "cuda" if cuda_available() and torch.cuda.is_available() else "cpu"
    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported() and cfg.precision != "fp32"
    dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    # On a CPU the weights (LoRA included) and AdamW's state stay fp32 and autocast lowers only the matmuls;
    # a CUDA GPU with bf16 holds the whole model in bf16, as before.
    bf16 = cuda_bf16 or autocast_bf16(cfg.precision, device, cuda_bf16)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    # On a CPU, eager attention: at the short sequences of question/answer pairs (the demo's average 81
    # tokens) it trains 1.2x faster than SDPA's CPU flash kernel, and at 400 tokens it is as fast.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                 **({"attn_implementation": "eager"} if device == "cpu" else {})
                                                 ).to(device)
    model.config.use_cache = False
    if previous_adapter is not None:
        model = PeftModel.from_pretrained(model, previous_adapter, is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=lora_targets(model, cfg.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    n_params = sum(p.numel() for p in model.parameters())  # before the head gets a bf16 copy of its own
    if bf16 and device == "cpu":
        frozen_linears_to_bf16(model)
    examples = encode_examples(tokenizer, samples, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    n_tokens = sum(len(e["input_ids"]) for e in examples) * cfg.epochs
    compiled = use_compile(cfg.compile, device, n_params, n_tokens) and compile_decoder_layers(model) > 0
    cross_entropy = compiled_cross_entropy() if compiled else answer_cross_entropy
    compile_error, unproven = None, compiled  # a compile is done, or fails, at the first micro-batch

    plan = step_plan(len(examples), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(plan, step))
    model.train()
    losses, tokens, step, micro = [], 0, 0, 0
    queue: list[list[dict]] = []
    # Mid-epoch checkpoints (loop/training/checkpoint.py): a killed training goes on from its last one.
    keep = checkpoint_dir if cfg.checkpoint_every else None
    position = {id(e): i for i, e in enumerate(examples)}
    fp = fingerprint(examples, cfg, previous_adapter) if keep else ""
    resumed = load_checkpoint(keep, fp, model=model, opt=opt, sched=sched)
    if resumed:
        step, micro, tokens, losses = resumed["step"], resumed["micro"], resumed["tokens"], resumed["losses"]
        queue = [[examples[i] for i in b] for b in resumed["queue"]]
        set_python_rng_state(rng, resumed["python_rng"])

    def forward_backward(ids, labels, mask):
        with autocast:
            loss = answer_loss(model, ids, labels, mask, cross_entropy)
        (loss / cfg.grad_accum).backward()
        return loss

    started = time.perf_counter()
    while micro < plan.micro_batches:
        if not queue:
            queue = length_bucketed_batches(examples, cfg.batch_size, rng)
        batch = queue.pop()
        ids, labels, mask = (t.to(device) for t in collate(batch, pad_id))
        seen = int(mask.sum())
        if compiled and len(batch) == 1:
            ids, labels, mask = without_a_batch_of_one(ids, labels, mask)
        rng_state = (torch.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None) \
            if unproven else None
        failed = None
        try:
            loss = forward_backward(ids, labels, mask)
        except Exception as e:
            if not unproven:
                raise
            failed = (f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0])[:300]
        if failed:
            # The compile failed (no working C++ compiler, an op Inductor can't lower): this micro-batch again,
            # eagerly, from the same state (outside the handler, so the failed attempt's activations are freed).
            compile_error, compiled, cross_entropy = failed, False, answer_cross_entropy
            uncompile(model)
            opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng_state[0])
            if rng_state[1] is not None:
                torch.cuda.set_rng_state(rng_state[1])
            loss = forward_backward(ids, labels, mask)
        unproven = False
        tokens += seen
        micro += 1
        acc_loss = float(loss.detach())
        if micro % cfg.grad_accum == 0 or micro == plan.micro_batches:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(acc_loss, 5))
            saved = bool(keep) and step % cfg.checkpoint_every == 0 and micro < plan.micro_batches
            if saved:
                save_checkpoint(keep, model=model, opt=opt, sched=sched, progress={
                    "fingerprint": fp, "step": step, "micro": micro, "tokens": tokens, "losses": losses,
                    "queue": [[position[id(e)] for e in b] for b in queue], "python_rng": python_rng_state(rng)})
            if on_step:
                on_step({"step": step, "steps": plan.steps, "loss": acc_loss, "lr": sched.get_last_lr()[0],
                         "tokens": tokens, "seconds": round(time.perf_counter() - started, 2),
                         **({"checkpoint": step} if saved else {})})
    seconds = time.perf_counter() - started
    model.eval()
    save_adapter_atomic(model, hf_dir, out)
    remove_checkpoint(checkpoint_dir)
    vram = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return TrainResult(adapter_dir=out, backend="peft", steps=step, losses=losses, tokens=tokens, seconds=seconds,
                       peak_rss_mb=peak_rss_mb(), peak_vram_mb=vram,
                       precision="bf16" if bf16 else "fp32", resumed_from_step=resumed["step"] if resumed else None,
                       compiled=compiled, compile_error=compile_error)
