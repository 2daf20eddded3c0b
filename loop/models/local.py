"""A user's own models, made ready once and kept in the store by content (`models/local/`).

An HF folder gets the GGUF isara serves (`serve_hf_folder`), a GGUF file the HF
checkpoint LoRA training needs (`train_gguf_file`), a chosen chat template is
written into a copy of either (`with_chat_template`); `add_local` is
`isara models add`. Each is found again by the digest of what it was made from,
so a run naming the same file or folder finds it, and is never made twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from server.errors import BadInput
from server.gguf import read_gguf

from loop.files import atomic_dir, write_json_atomic
from loop.models.derive import check_derivable, derive_hf_checkpoint
from loop.models.store import Model, models_dir, resolve_model


# What decides a checkpoint's weights and vocabulary; other files (READMEs, images) may change freely.
_CHECKPOINT_FILES = ("config.json", "generation_config.json", "*.safetensors", *(
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.*", "merges.txt"))


def checkpoint_digest(hf_dir: Path) -> str:
    """sha256 over the checkpoint's files (names and contents): the same weights give the same digest."""
    h = hashlib.sha256()
    files = sorted({f for pattern in _CHECKPOINT_FILES for f in hf_dir.glob(pattern) if f.is_file()})
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def serve_hf_folder(model: Model, log=print) -> Model:
    """A local HF folder gets the GGUF isara serves, made like every iteration's model (converted to F16,
    verified strictly against the folder's weights, then quantized: Q8_0 below 1B parameters). Cached in
    the store by the checkpoint's digest, so it is made once per set of weights and never redone."""
    if model.gguf is not None or model.hf_dir is None:
        return model
    digest = checkpoint_digest(model.hf_dir)
    d = _local_dir(model.name, digest, "EXPORTED.json")
    marker = d / "EXPORTED.json"
    if not marker.is_file():
        from loop.models.convert import count_params, export_base, resolve_quant

        quant = resolve_quant("auto", count_params(model.hf_dir))
        log(f"{model.name}: exporting {model.hf_dir} to a GGUF to serve ({quant}; F16 verified against the "
            f"checkpoint first), once, into {d}")
        d.mkdir(parents=True, exist_ok=True)
        # The converter names the GGUF after the folder; a store copy (a chosen template's) is named "hf", so it
        # passes on the user's folder's name instead.
        copied = model.gguf_name is not None and model.hf_dir.name != model.gguf_name
        verification = export_base(model.hf_dir, d / "model.gguf", quant,
                                   model_name=model.gguf_name if copied else None)
        write_json_atomic(marker, {"hf_dir": str(model.hf_dir), "sha256": digest, "quant": quant,
                                   "verification": verification})
    model.gguf = d / "model.gguf"
    return model


def _local_dir(name: str, digest: str, marker: str) -> Path:
    """Where what isara made of a user's model lives: found by content, whatever name it was added under
    (`isara models add --name`), so a run naming the same file or folder finds it too."""
    local = models_dir() / "local"
    for d in sorted(local.glob(f"*-{digest[:12]}")):
        if (d / marker).is_file():
            return d
    return local / f"{name}-{digest[:12]}"


# --- a chosen chat template, made part of the model ------------------------------------

_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def with_chat_template(model: Model, template: str, log=print) -> Model:
    """The model with `template` as its chat template (`model.chat_template`, `model.system_prompt`): a copy
    in the store whose HF tokenizer and GGUF metadata carry it, so the served GGUF, the checkpoint trained
    on and every export render conversations alike. The HF weights are hard links where the file system
    allows; a GGUF is copied whole with its new metadata. Made once per model and template, found again by
    content (each run start hashes the model's files to find it)."""
    from server.gguf import set_chat_template

    sources = [_file_digest(model.gguf)] if model.gguf is not None else []
    sources += [checkpoint_digest(model.hf_dir)] if model.hf_dir is not None else []
    key = hashlib.sha256("\0".join([*sources, template]).encode()).hexdigest()
    d = _local_dir(f"{model.name}-templated", key, "TEMPLATED.json")
    if not (d / "TEMPLATED.json").is_file():
        log(f"{model.name}: writing the chosen chat template into a copy of the model, once, into {d}")
        d.mkdir(parents=True, exist_ok=True)
        if model.gguf is not None:
            set_chat_template(model.gguf, d / "model.gguf", template)
        if model.hf_dir is not None:
            with atomic_dir(d / "hf") as tmp:
                tokenizer = {f for pattern in _TOKENIZER_FILES for f in model.hf_dir.glob(pattern)}
                for f in model.hf_dir.iterdir():
                    if not f.is_file():
                        continue
                    if f in tokenizer:
                        shutil.copy2(f, tmp / f.name)
                    else:
                        try:
                            os.link(f, tmp / f.name)  # the weights: no second copy
                        except OSError:
                            shutil.copy2(f, tmp / f.name)
                config_path = tmp / "tokenizer_config.json"
                if config_path.is_file():  # the template lives in chat_template.jinja alone
                    config = json.loads(config_path.read_text(encoding="utf-8"))
                    config.pop("chat_template", None)
                    write_json_atomic(config_path, config)
                (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        write_json_atomic(d / "TEMPLATED.json", {"gguf": str(model.gguf) if model.gguf else None,
                                                 "hf_dir": str(model.hf_dir) if model.hf_dir else None,
                                                 "template_sha256": hashlib.sha256(template.encode()).hexdigest()})
    model.gguf = d / "model.gguf" if model.gguf is not None else None
    model.hf_dir = d / "hf" if model.hf_dir is not None else None
    return model


# --- a user's GGUF file, made trainable ----------------------------------------------

def train_gguf_file(model: Model, log=print) -> Model:
    """A local GGUF file gets the HF checkpoint LoRA training needs: transformers dequantizes it into float32
    safetensors, then the checkpoint is verified against llama-server on the same file (transformers loads
    some GGUFs silently wrong). Cached in the store by the file's sha256: made once per file, never redone."""
    if model.hf_dir is not None or model.gguf is None:
        return model
    info = read_gguf(model.gguf)
    check_derivable(model.gguf, info)
    with open(model.gguf, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    d = _local_dir(model.name, digest, "DERIVED.json")
    if not (d / "DERIVED.json").is_file():
        from loop.models.verify import verify_derived

        log(f"{model.name}: deriving the HF checkpoint to train from {model.gguf} ({info.architecture}, "
            f"{info.quant}; dequantized to float32, then verified against llama-server on the GGUF), once, into {d}")
        try:
            derive_hf_checkpoint(model.gguf, d / "hf")
            log(f"{model.name}: verifying the derived checkpoint against llama-server on {model.gguf.name}")
            verification = verify_derived(d / "hf", model.gguf)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)  # half a derivation is never trained on, nor kept
            raise
        if not verification["passed"]:
            shutil.rmtree(d, ignore_errors=True)
            raise BadInput(f"the HF checkpoint transformers derives from {model.gguf} does not answer like "
                           f"llama-server on it ({'; '.join(verification['problems'])}): transformers loads this "
                           f"{info.architecture} GGUF wrongly; give the model's HF folder (safetensors) instead")
        write_json_atomic(d / "DERIVED.json", {"gguf": str(model.gguf), "sha256": digest,
                                               "architecture": info.architecture, "quant": info.quant,
                                               "verification": verification})
        log(f"{model.name}: derived and verified (log-probs within "
            f"{verification['logprob_drift']['nats']} nats of llama-server's)")
    model.hf_dir = d / "hf"
    return model


def add_local(spec: str | Path, name: str | None = None, log=print, chat_template: str | None = None) -> Model:
    """`isara models add`: a user's HF folder gets its GGUF to serve, a GGUF file its checkpoint to train
    (`chat_template`: as model.chat_template, for a model without one)."""
    model = resolve_model(spec)
    if model.entry is not None:
        raise BadInput(f"{spec} is a catalog model: fetch it with `isara models pull {spec}`")
    if model.kind != "chat":
        raise BadInput(f"{spec} is an embedding model, used from its folder as it is: name it as model.embedder")
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise BadInput(f"--name {name!r} is not a plain name: use letters, digits, '.', '_' and '-'")
        model.name = name
    from loop.models.memory import available_memory, check_fits, conversion_estimate, model_shape

    needs = conversion_estimate(model_shape(model), derive=model.hf_dir is None, convert=model.gguf is None)
    check_fits(str(spec), needs, available_memory())
    if chat_template is not None:
        from loop.models.templates import chosen_template, own_template

        template = chosen_template(chat_template)
        if template != own_template(model):
            model = with_chat_template(model, template, log)
    return train_gguf_file(serve_hf_folder(model, log), log)
