"""What both training backends share: the data, the step plan, the adapter on disk.

- `encode_examples`: each sample's conversation on the model's own chat template
  (a user turn with the question, an assistant turn with the answer, after a
  multi-turn record's system message and earlier turns), labels on the assistant
  turns only; examples with no answer token left after truncation are dropped.
- `step_plan`: micro-batches, optimizer steps and warmup from the sample count.
- `save_adapter_atomic`: the PEFT adapter plus the base's tokenizer files,
  written to a temporary folder and renamed into place.
- `TrainResult`, `peak_rss_mb`: what a backend reports.

`loop/training/peft.py` and `loop/training/unsloth.py` import this; nothing here
imports a backend, so there is no circle.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from server.errors import BadInput

from loop.config import TrainConfig
from loop.files import atomic_dir
from loop.models.convert import copy_tokenizer_files

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
    precision: str = "fp32"  # of the matmuls: fp32, or bf16 (autocast, or bf16 weights on a GPU)
    resumed_from_step: int | None = None  # a mid-epoch checkpoint this training went on from
    compiled: bool = False  # the decoder layers ran torch.compile'd (`train.compile`)
    compile_error: str | None = None  # why a compile asked for fell back to eager

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        return {"backend": self.backend, "steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "tokens": self.tokens,
                "seconds": round(self.seconds, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "peak_rss_mb": round(self.peak_rss_mb), "peak_vram_mb": self.peak_vram_mb and round(self.peak_vram_mb),
                "precision": self.precision, "resumed_from_step": self.resumed_from_step, "compiled": self.compiled,
                **({"compile_error": self.compile_error} if self.compile_error else {})}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """A CPU whose matmul units take bf16 (AVX512-BF16 or AMX): there bf16 autocast roughly doubles
    training speed; elsewhere torch emulates bf16 and it is slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_bf16(precision: str, device: str, cuda_bf16: bool = False) -> bool:
    """Whether the PEFT loop runs its forward and backward under bf16 autocast (`train.precision`)."""
    if precision != "auto":
        return precision == "bf16"
    return cuda_bf16 if device == "cuda" else cpu_has_native_bf16()


def _unwrapped(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Model parameters x training tokens from which `train.compile = "auto"` compiles on a CPU. The compile
# costs about the same for any model size (one decoder layer's graph): 3 s from the cache, about 15 s the
# first time on a machine, against a third of the eager training time it saves. The demo's first training
# (135M x 23k tokens) is 3e12 and saves ~20 s; the tiny test models are far below.
COMPILE_MIN_WORK = 1e12


def use_compile(setting: str, device: str, n_params: int, n_tokens: int) -> bool:
    """Whether the PEFT loop compiles its decoder layers (`train.compile`)."""
    if setting != "auto":
        return setting == "on"
    return device == "cpu" and n_params * n_tokens >= COMPILE_MIN_WORK


def compile_decoder_layers(model) -> int:
    """Regional compilation: each decoder layer (the classes the model names as not to be split) gets
    `torch.compile`, in place, with dynamic shapes (the batches' lengths vary). Every layer runs the same
    code, so they share one compiled graph: a 30-layer model compiles like a one-layer one. Inductor fuses
    the element-wise work around the matmuls (norms, rotary, SiLU, softmax, the autocast casts), which
    was about half a CPU step. The compiled kernels are cached under $ISARA_CACHE/inductor, so the next
    training, in this process or another, loads them in seconds. Returns how many layers were compiled."""
    import os

    import torch

    from server.toolchain import cache_root

    base = _unwrapped(model)
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in kinds]
    if not layers:
        return 0
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    # With dynamic shapes, torch 2.13 first traces float constants (the LoRA scale, a norm's epsilon) as
    # symbols, then restarts the whole analysis to specialize them: twice the tracing, 6.5 s instead of
    # 3.3 s to load a cached layer. (Process-wide; isara compiles nothing else.)
    torch._dynamo.config.specialize_float = True
    # The first layer's input would be the frozen embeddings' output, which needs no gradient, and it
    # would get a graph of its own (a second compile and a second cache load, against 1/30 of the frozen
    # matmuls' backward to find that gradient).
    base.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compiled_cross_entropy():
    """`answer_cross_entropy` compiled: the cast of the logits to fp32 and the log-softmax over the
    vocabulary fuse, forward and backward (on the demo's set a step 3-6% faster). Compiled at its first
    call, so a failure is caught where the layers' is."""
    import torch

    return torch.compile(answer_cross_entropy, dynamic=True)


def uncompile(model) -> None:
    """Back to eager, where a compile failed (no working C++ compiler, an op Inductor can't lower). Dynamo's
    caches are cleared too, so a later training in this process tries afresh."""
    import torch

    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    base = _unwrapped(model)
    base.disable_input_require_grads()
    torch._dynamo.reset()


def without_a_batch_of_one(ids, labels, mask):
    """A batch of one sequence doubled with a copy that carries no label. Dynamic shapes still specialize a
    size of 1: a compiled model would compile a second graph in the middle of the training (a length-
    bucketed epoch ends on one whenever the examples leave a remainder of 1), past the first micro-batch
    where a failed compile falls back to eager. The copy adds nothing to the loss or the gradients."""
    import torch

    return torch.cat([ids, ids]), torch.cat([labels, torch.full_like(labels, IGNORE)]), torch.cat([mask, mask])


def lora_targets(model, requested: list[str]) -> list[str]:
    """The linear layers that get a LoRA, by name suffix. "all-linear" takes every linear layer of the
    decoder but the output head, whatever a family calls them (Llama, Qwen, Mistral, Gemma: q_proj ...
    down_proj; Phi-3: qkv_proj, gate_up_proj ...), so a user's model is trained in full without knowing its
    names. A named layer the model does not have is refused: PEFT would skip it without a word."""
    import torch

    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    if list(requested) == ["all-linear"]:
        if not linear:
            from server.errors import BadInput

            raise BadInput(f"this {getattr(model.config, 'model_type', 'model')} model has no linear layers in "
                           "decoder blocks named `layers` for a LoRA: name its layers in train.target_modules")
        return sorted(linear)
    missing = [t for t in requested if t not in linear]
    if missing:
        from server.errors import BadInput

        raise BadInput(f"train.target_modules names {', '.join(missing)}, which this "
                       f"{getattr(model.config, 'model_type', 'model')} model does not have (its linear layers: "
                       f"{', '.join(sorted(linear))}): use those names, or [\"all-linear\"]")
    return list(requested)


# --- data ---------------------------------------------------------------------

def encode_example(tokenizer, question: str, answer: str, max_length: int, context: list[dict] = (),
                   loss_on: str = "all") -> dict:
    """Token ids of the chat-formatted conversation (`context`, the question, the answer), with labels on
    the assistant turns only: every one (`loss_on="all"`, training) or the answer (`"last"`, scoring).

    An assistant turn's labelled span starts where the template, rendered up to that turn with
    add_generation_prompt, ends, and runs to the end of the turn rendered whole (so its end-of-turn
    carries the loss and the model learns to stop). Offsets of the full text decide the boundaries, so a
    BPE merge across one can't shift it. A template that renders a prefix differently inside the whole
    conversation (or can't render it) raises ValueError.
    """
    messages = [*context, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def render(turns, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2's TemplateError, or a template's own raise_exception()
            raise ValueError(f"the chat template can't render this conversation ({e})") from None

    full_text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (loss_on == "last" and i != len(messages) - 1):
            continue
        start, end = render(messages[:i], True), full_text if i == len(messages) - 1 else render(messages[:i + 1])
        if not (full_text.startswith(start) and full_text.startswith(end)):
            raise ValueError("the chat template renders the prompt differently inside the full conversation")
        spans.append((len(start), len(end)))
    # add_special_tokens: a BOS where the tokenizer adds one, as the server does; its offset (0, 0) keeps it
    # out of the loss.
    enc = tokenizer(full_text, add_special_tokens=True, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(a <= first < b for a, b in spans) else IGNORE
              for tok, (first, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_examples(tokenizer, samples, max_length: int) -> list[dict]:
    """Every sample encoded; those whose answer was cut away entirely carry no loss and are dropped.
    A conversation the template can't render is bad input naming its record."""
    examples = []
    for s in samples:
        try:
            examples.append(encode_example(tokenizer, s.prompt, s.response, max_length, s.context))
        except ValueError as e:
            where = f"{s.meta['file']}:{s.meta['line']}" if "file" in s.meta else s.id
            raise BadInput(f"{where}: {e}: fix the record or set model.chat_template to one that renders "
                           "it") from None
    return [e for e in examples if any(label != IGNORE for label in e["labels"])]


@dataclass(frozen=True)
class StepPlan:
    micro_batches: int  # forward/backward passes
    steps: int  # optimizer steps (micro_batches / grad_accum, rounded up)
    warmup: int  # of those steps


def step_plan(n_examples: int, cfg: TrainConfig) -> StepPlan:
    """Fractional epochs round up to whole micro-batches; there is always at least one step."""
    micro = max(1, math.ceil(math.ceil(n_examples / cfg.batch_size) * cfg.epochs))
    steps = max(1, math.ceil(micro / cfg.grad_accum))
    return StepPlan(micro_batches=micro, steps=steps, warmup=int(steps * cfg.warmup_ratio))


def lr_factor(plan: StepPlan, step: int) -> float:
    """The learning rate's multiplier at optimizer step `step`: linear warmup, then linear decay to 0."""
    if step < plan.warmup:
        return (step + 1) / (plan.warmup + 1)
    return max(0.0, (plan.steps - step) / max(1, plan.steps - plan.warmup))


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


# A micro-batch's width is rounded up to a multiple of this. oneDNN compiles a bf16 matmul kernel for each new
# shape it meets (about 7 ms each, and a micro-batch of a new size brings some twenty matmuls of new shapes); the
# demo's training met 37 (batch, width) sizes in 72 micro-batches, 10 once widths are rounded to 8: 1.06x the
# tokens/s compiled, 1.10x eager, for 5% more positions computed (BENCHMARKS.md). Padding is masked and
# unlabelled, so it changes no loss.
PAD_MULTIPLE = 8


def collate(batch: list[dict], pad_id: int, multiple_of: int = PAD_MULTIPLE):
    import torch

    width = -(-max(len(e["input_ids"]) for e in batch) // multiple_of) * multiple_of
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def answer_cross_entropy(logits, targets):
    """The mean cross-entropy over the labelled positions, in fp32 whatever the logits' dtype."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def answer_loss(model, ids, labels, mask, cross_entropy=answer_cross_entropy):
    """The mean cross-entropy over the answer tokens, with the output head applied only where a label is.

    The head is the largest matmul of a small model (SmolLM2-135M: 576 x 49,152) and its log-softmax
    the largest activation; the labels cover about half of each sequence, so computing every logit
    wastes about half of both. The model's own forward keeps the logits at the positions any row of
    the batch has a next-token label for (`logits_to_keep`, so a family's final soft-capping and head
    scaling still apply); the loss is the mean over labelled tokens, as the model's own loss computes
    it. A model whose forward has no `logits_to_keep` gets the full forward with labels. `cross_entropy`:
    `answer_cross_entropy`, or its compiled form (`compiled_cross_entropy`)."""
    import inspect

    base = _unwrapped(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    targets = labels[:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return cross_entropy(logits, targets[:, keep])


def frozen_linears_to_bf16(model) -> int:
    """Hold the frozen weights under each LoRA, and the output head, in bf16: under CPU bf16 autocast they
    were cast to bf16 at every matmul of every micro-batch anyway (a tenth of a step's time in copies; the
    head of a 49k vocabulary alone 18 ms a micro-batch), so the numbers are the same. A head tied to the
    input embeddings gets a bf16 copy of its own: the embeddings look up fp32 rows as before. The LoRA
    weights, norms, embeddings and AdamW's state stay fp32; only the adapter is saved, so the merge and
    export still start from the checkpoint's own weights. Returns how many were cast, the head included."""
    import torch

    n = 0
    for name, module in model.named_modules():
        if name.endswith(".base_layer") and isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            n += 1
    base = _unwrapped(model)
    head = base.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.weight.dtype != torch.bfloat16:
        head.weight = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
        n += 1
    return n


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_adapter_atomic(model, base_hf: Path, out: Path) -> Path:
    """The LoRA only (PEFT format, safetensors) with the base's tokenizer files, whole or not at all."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(base_hf, tmp)
    return out


