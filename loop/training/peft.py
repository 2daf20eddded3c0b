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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = "cuda" if cuda_available() and torch.cuda.is_available() else "cpu"
    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported() and cfg.precision != "fp32"
    # On a CPU the weights (LoRA included) and AdamW's state stay fp32 and autocast lowers only the matmuls;
    # a CUDA GPU with bf16 holds the whole model in bf16, as before.
    bf16 = cuda_bf16 or autocast_bf16(cfg.precision, device, cuda_bf16)
    model, tokenizer = _lora_model(hf_dir, cfg, previous_adapter, device,
                                   torch.bfloat16 if cuda_bf16 else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())  # before the head gets a bf16 copy of its own
    if bf16 and device == "cpu":
        frozen_linears_to_bf16(model)
    examples = encode_examples(tokenizer, samples, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    n_tokens = sum(len(e["input_ids"]) for e in examples) * cfg.epochs
    compiled = use_compile(cfg.compile, device, n_params, n_tokens) and compile_decoder_layers(model) > 0
    run = _Run(model, cfg, device, bf16, compiled, examples)
    # Mid-epoch checkpoints (loop/training/checkpoint.py): a killed training goes on from its last one.
    keep = checkpoint_dir if cfg.checkpoint_every else None
    fp = fingerprint(examples, cfg, previous_adapter) if keep else ""
    resumed = run.resume(keep, fp, rng)
    started = time.perf_counter()
    while run.micro < run.plan.micro_batches:
        loss = run.micro_batch(rng, pad_id)
        if run.micro % cfg.grad_accum == 0 or run.micro == run.plan.micro_batches:
            saved = run.optimizer_step(loss, keep, fp, rng)
            if on_step:
                on_step({"step": run.step, "steps": run.plan.steps, "loss": loss, "lr": run.sched.get_last_lr()[0],
                         "tokens": run.tokens, "seconds": round(time.perf_counter() - started, 2),
                         **({"checkpoint": run.step} if saved else {})})
    seconds = time.perf_counter() - started
    model.eval()
    save_adapter_atomic(model, hf_dir, out)
    remove_checkpoint(checkpoint_dir)
    vram = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return TrainResult(adapter_dir=out, backend="peft", steps=run.step, losses=run.losses, tokens=run.tokens,
                       seconds=seconds, peak_rss_mb=peak_rss_mb(), peak_vram_mb=vram,
                       precision="bf16" if bf16 else "fp32", resumed_from_step=resumed["step"] if resumed else None,
                       compiled=run.compiled, compile_error=run.compile_error)


def _lora_model(hf_dir: Path, cfg: TrainConfig, previous_adapter: Path | None, device: str, dtype):
    """The base checkpoint with a fresh LoRA (or `previous_adapter`, trainable), on `device`; its tokenizer."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    # On a CPU, eager attention: at the short sequences of question/answer pairs (the demo's average 81
    # tokens) it trains 1.2x faster than SDPA's CPU flash kernel, and at 400 tokens it is as fast.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                 **({"attn_implementation": "eager"} if device == "cpu" else {})
                                                 ).to(device)
    model.config.use_cache = False
    if previous_adapter is not None:
        return PeftModel.from_pretrained(model, previous_adapter, is_trainable=True), tokenizer
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=lora_targets(model, cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


class _Run:
    """One training between its micro-batches: the model, optimizer and schedule, where the epoch stands (the
    batches left in it), the losses and tokens so far, and whether the compiled layers have proven themselves."""

    def __init__(self, model, cfg: TrainConfig, device: str, bf16: bool, compiled: bool, examples: list[dict]):
        import torch

        self.model, self.cfg, self.device, self.examples = model, cfg, device, examples
        self.autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
        self.compiled = compiled
        self.cross_entropy = compiled_cross_entropy() if compiled else answer_cross_entropy
        self.compile_error, self.unproven = None, compiled  # a compile is done, or fails, at the first micro-batch
        self.plan = plan = step_plan(len(examples), cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(plan, step))
        model.train()
        self.losses, self.tokens, self.step, self.micro = [], 0, 0, 0
        self.queue: list[list[dict]] = []
        self.position = {id(e): i for i, e in enumerate(examples)}

    def resume(self, keep: Path | None, fp: str, rng: random.Random) -> dict | None:
        """Go on from the last mid-epoch checkpoint in `keep`, when one of this very training is there."""
        resumed = load_checkpoint(keep, fp, model=self.model, opt=self.opt, sched=self.sched)
        if resumed:
            self.step, self.micro, self.tokens, self.losses = (resumed["step"], resumed["micro"], resumed["tokens"],
                                                               resumed["losses"])
            self.queue = [[self.examples[i] for i in b] for b in resumed["queue"]]
            set_python_rng_state(rng, resumed["python_rng"])
        return resumed

    def _forward_backward(self, ids, labels, mask):
        with self.autocast:
            loss = answer_loss(self.model, ids, labels, mask, self.cross_entropy)
        (loss / self.cfg.grad_accum).backward()
        return loss

    def micro_batch(self, rng: random.Random, pad_id: int) -> float:
        """The next micro-batch, forward and backward; returns its loss."""
        import torch

        if not self.queue:
            self.queue = length_bucketed_batches(self.examples, self.cfg.batch_size, rng)
        batch = self.queue.pop()
        ids, labels, mask = (t.to(self.device) for t in collate(batch, pad_id))
        seen = int(mask.sum())
        if self.compiled and len(batch) == 1:
            ids, labels, mask = without_a_batch_of_one(ids, labels, mask)
        rng_state = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.device == "cuda" else None) \
            if self.unproven else None
        failed = None
        try:
            loss = self._forward_backward(ids, labels, mask)
        except Exception as e:
            if not self.unproven:
                raise
            failed = (f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0])[:300]
        if failed:
            # The compile failed (no working C++ compiler, an op Inductor can't lower): this micro-batch again,
            # eagerly, from the same state (outside the handler, so the failed attempt's activations are freed).
            self.compile_error, self.compiled, self.cross_entropy = failed, False, answer_cross_entropy
            uncompile(self.model)
            self.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng_state[0])
            if rng_state[1] is not None:
                torch.cuda.set_rng_state(rng_state[1])
            loss = self._forward_backward(ids, labels, mask)
        self.unproven = False
        self.tokens += seen
        self.micro += 1
        return float(loss.detach())

    def optimizer_step(self, loss: float, keep: Path | None, fp: str, rng: random.Random) -> bool:
        """Clip, step, schedule; a mid-epoch checkpoint every train.checkpoint_every steps. True: one was saved."""
        import torch

        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(round(loss, 5))
        saved = bool(keep) and self.step % self.cfg.checkpoint_every == 0 and self.micro < self.plan.micro_batches
        if saved:
            save_checkpoint(keep, model=self.model, opt=self.opt, sched=self.sched, progress={
                "fingerprint": fp, "step": self.step, "micro": self.micro, "tokens": self.tokens,
                "losses": self.losses, "queue": [[self.position[id(e)] for e in b] for b in self.queue],
                "python_rng": python_rng_state(rng)})
        return saved
