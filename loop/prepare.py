"""The first phase of every run: the base model, prepared as every later phase uses it.

`model.base` names a catalog model, a GGUF file or an HF folder. Before it is
served or trained, the run checks that the machine has the memory the run
needs (conversion, serving, training: loop/models/memory.py), writes the chosen
chat template into a copy of the model (`model.chat_template`,
`model.system_prompt`), makes the GGUF an HF folder is served from and the
checkpoint a GGUF file is trained from (each made once in the model store and
found again there: loop/models/local.py), and checks that llama.cpp can convert
the architecture, that the disk has room for an export and that the chat
template renders the training conversations. It writes base.json: what the run
serves and trains, for every later phase and every later session (a run
trains and serves with the template it began with).
"""

from __future__ import annotations

import hashlib
import json

from server.errors import BadInput

from loop.config import RunConfig
from loop.files import write_json_atomic
from loop.layout import RunLayout
from loop.models.convert import count_params, preflight
from loop.models.local import serve_hf_folder, train_gguf_file, with_chat_template
from loop.models.memory import available_gpu_memory, available_memory, check_fits, estimate, model_shape, \
    vram_estimate
from loop.models.store import Model, resolve_model
from loop.models.templates import BUILTIN as BUILTIN_TEMPLATES
from loop.models.templates import effective_template, own_template
from loop.phases import RunContext, Written, load_run_samples
from loop.training.log import check_report_to
from loop.training.train import check_backend


def prepare_base(ctx: RunContext) -> Written:
    """model.base made ready to serve and to train, recorded in base.json (see the module's note)."""
    cfg, layout = ctx.cfg, ctx.layout
    log = lambda m: ctx.events.emit("message", text=m)  # noqa: E731
    ctx.events.emit("prepare_started", model=cfg.model.base, training=cfg.train.enabled)
    base = resolve_model(cfg.model.base)
    if base.kind != "chat":
        raise BadInput(f"{cfg.model.base} is an embedding model: set model.base to a chat model (a catalog name, "
                       "a .gguf file or an HF folder)")
    _check_memory(cfg, base)  # before any conversion, server or training
    own = own_template(base)
    template = _run_template(cfg, layout, own)
    if template != own:
        base = with_chat_template(base, template, log=log)
    if base.gguf is None and not cfg.generation.endpoints:  # an HF folder: export the GGUF to serve, once
        base = serve_hf_folder(base, log=log)
    if cfg.train.enabled:
        base = _trainable(ctx, base, log)
    record = {"base": cfg.model.base, **base.record(),
              "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}
    write_json_atomic(layout.base_model, record)
    ctx.events.emit("prepare_finished", **record)
    ctx.forget_base()  # the phases after this one read what it recorded
    return [layout.base_model], record


def _check_memory(cfg: RunConfig, base: Model) -> None:
    gpu_training = cfg.train.enabled and check_backend(cfg.train) == "unsloth"  # QLoRA only there
    shape = model_shape(base)
    needs = estimate(shape, cfg, derive=cfg.train.enabled and base.hf_dir is None,
                     convert=base.gguf is None and not cfg.generation.endpoints, gpu_training=gpu_training)
    check_fits(cfg.model.base, needs, available_memory())
    if gpu_training:
        check_fits(cfg.model.base, vram_estimate(shape, cfg), available_gpu_memory(), gpu=True)


def _run_template(cfg: RunConfig, layout: RunLayout, own: str | None) -> str:
    """The chat template the run trains, serves and exports with; the one it began with, on a resume."""
    template = effective_template(own, cfg.model.chat_template, cfg.model.system_prompt)
    if template is None:
        raise BadInput(f"{cfg.model.base} has no chat template (a base model?), which training, serving and "
                       "evaluation format every conversation with: set model.chat_template to a built-in "
                       f"({', '.join(BUILTIN_TEMPLATES)}) or a Jinja file")
    sha = hashlib.sha256(template.encode()).hexdigest()
    if layout.base_model.is_file():  # a resumed run trains and serves with the template it began with
        began = json.loads(layout.base_model.read_text(encoding="utf-8")).get("chat_template_sha256")
        if began and began != sha:
            raise BadInput(f"run {layout.name} began with another chat template (sha256 {began[:12]}, now "
                           f"{sha[:12]}: model.chat_template's file or model.system_prompt changed): "
                           "restore them, or start a new run")
    return template


def _trainable(ctx: RunContext, base: Model, log) -> Model:
    """The checkpoint the run trains (a GGUF file's derived once), checked before any training: llama.cpp
    converts its architecture, the disk has room for an export, the template renders every conversation."""
    cfg, layout = ctx.cfg, ctx.layout
    if base.hf_dir is None and base.entry is not None:
        raise BadInput(f"{cfg.model.base} was pulled without its training checkpoint (--no-hf): run "
                       f"`isara models pull {cfg.model.base}`, or set train.enabled = false")
    if base.hf_dir is None:  # a GGUF file: derive the checkpoint to train and verify it, once
        base = train_gguf_file(base, log=log)
    base.params = count_params(base.hf_dir)
    preflight(base.hf_dir, layout.root, base.params)  # fail now, not after training
    held = [s for f in (layout.validation, layout.holdout) if f.is_file() for s in load_run_samples(f, "seed")]
    _renderable(base.hf_dir, [s for s in ctx.seeds + held if s.context], cfg.train.max_length)
    check_report_to(cfg.train.report_to)
    return base


def _renderable(hf_dir, conversations: list, max_length: int) -> None:
    """Multi-turn seeds (trained or held out) the chat template can't render (a system message to a template
    without a system role) are refused now, naming the record, not when the first training or evaluation
    meets them."""
    if conversations:
        from transformers import AutoTokenizer

        from loop.training.common import encode_examples

        encode_examples(AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False), conversations, max_length)
