"""Conversion: an adapter merged into its base, an HF checkpoint made a GGUF, quantized, verified.

merged (default): merge the LoRA into the base, save safetensors, convert to
GGUF f16 with llama.cpp's converter, quantize (`export.quant`), verify
(loop/models/verify.py).
lora: convert the adapter to a LoRA GGUF and serve it on the base GGUF with
`--lora` (faster export, the same outputs).

Every iteration's export goes through `export_iteration`; the store makes a base
model servable the same way (`export_base`), so the base and the iterations
share a weight type and what separates their answers is training, not
quantization.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server.errors import BadInput
from server.gguf import QUANT_TYPES, convert_hf_to_gguf, convert_lora_to_gguf, quantize, read_gguf
from server.toolchain import require_toolchain

from loop.files import atomic_dir
from loop.models.verify import NEAR_TIE, VERIFY_TOKENS, Reference, checkpoint_reference, load_checkpoint, \
    reference_tokens, verify, with_f16

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "vocab.*", "merges.txt")


class ExportSettings(Protocol):
    """How an export is made and checked: the run's [export] section (loop/config.py ExportConfig)."""
    mode: str  # merged | lora
    quant: str
    verify: str  # strict | record | off
    verify_tokens: int
    near_tie: float


@dataclass(frozen=True)
class _Strict:
    """A base model's export: always verified strictly, at the default depth."""
    quant: str
    mode: str = "merged"
    verify: str = "strict"
    verify_tokens: int = VERIFY_TOKENS
    near_tie: float = NEAR_TIE


@dataclass
class Exported:
    serve_model: Path  # the GGUF to serve
    serve_lora: list[Path]  # LoRA GGUFs to load with it (lora mode)
    info: dict

    def to_json(self) -> dict:
        return {"serve_model": str(self.serve_model), "serve_lora": [str(p) for p in self.serve_lora], **self.info}


def resolve_quant(requested: str, params: int) -> str:
    q = requested.upper()
    if q == "AUTO":
        return "Q8_0" if params < 1_000_000_000 else "Q4_K_M"
    if q not in QUANT_TYPES:
        raise BadInput(f"export.quant = {requested!r} is not known: use auto or one of {', '.join(QUANT_TYPES)}")
    return q


def preflight(hf_dir: Path, out_dir: Path, params: int) -> None:
    """Before training: can this architecture be converted, and is there room for the export?"""
    tc = require_toolchain()
    config = json.loads((hf_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    sources = [tc.convert_hf] + sorted((tc.convert_hf.parent / "conversion").glob("*.py"))
    if not any(f'"{arch}"' in p.read_text(encoding="utf-8", errors="replace") for p in sources):
        raise BadInput(f"llama.cpp's converter does not support the architecture {arch} of {hf_dir}: "
                       "choose a model whose architecture llama.cpp supports (e.g. Llama, Qwen2, Mistral)")
    # merged fp32 safetensors + f16 GGUF + the quantized GGUF (at most 8 bits), with 20% to spare
    need = int(params * (4 + 2 + 1) * 1.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise BadInput(f"not enough disk space in {out_dir} for the export: {free / 2**30:.1f} GiB free, "
                       f"about {need / 2**30:.1f} GiB needed; free some space or move runs_dir")


def count_params(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def load_adapted(base_hf: Path, adapter_dir: Path):
    from peft import PeftModel

    base, tok = load_checkpoint(base_hf)
    return PeftModel.from_pretrained(base, adapter_dir).eval(), tok



def save_merged(model, base_hf: Path, out: Path) -> Path:
    """The LoRA merged into its base, saved whole (safetensors) with the base's tokenizer files."""
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(base_hf, tmp)  # the LoRA does not touch the tokenizer: keep the base's, verbatim
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The base's tokenizer files, verbatim. Re-saving a loaded tokenizer can drop files
    (tokenizer.model), and the converter then reads another vocabulary than the one trained on."""
    for pattern in TOKENIZER_FILES:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def export_iteration(*, base_hf: Path, base_gguf: Path | None, adapter_dir: Path, out_dir: Path,
                     cfg: ExportSettings, params: int, on_step=None) -> Exported:
    """Adapter -> a GGUF to serve (or base GGUF + LoRA GGUF), verified. Seconds per step in `info`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 2)
        t = now
        if on_step:
            on_step({"step": name, "seconds": seconds[name]})

    model, tokenizer = load_adapted(base_hf, adapter_dir)
    f16_verification = None
    reference = reference_tokens(model, tokenizer, cfg.verify_tokens) if cfg.verify != "off" else []
    step("load")
    if cfg.mode == "merged":
        quant = resolve_quant(cfg.quant, params)
        merged_dir = save_merged(model, base_hf, out_dir / "merged")
        del model
        step("merge")
        name = read_gguf(base_gguf).metadata.get("general.name") if base_gguf is not None else None
        final, fallbacks, f16_verification = _checkpoint_to_gguf(merged_dir, out_dir / "model.gguf", quant,
                                                                 reference, tokenizer, cfg, step, name)
        serve, lora = final, []
    else:
        del model
        quant = "F16" if base_gguf is None else read_gguf(base_gguf).quant
        if base_gguf is None:  # a base given as an HF folder: convert it once per run
            base_gguf = out_dir.parent / "base-f16.gguf"
            if not base_gguf.exists():
                convert_hf_to_gguf(base_hf, base_gguf)
        adapter_gguf = convert_lora_to_gguf(adapter_dir, base_hf, out_dir / "adapter.gguf")
        step("convert")
        serve, lora, fallbacks = base_gguf, [adapter_gguf], 0
    verification = None
    if cfg.verify != "off":
        verification = verify(serve, lora, reference, tokenizer, quant, cfg.verify, cfg.verify_tokens, cfg.near_tie)
        verification = with_f16(verification, f16_verification)
        step("verify")
    info = {"mode": cfg.mode, "quant": quant, "k_quant_fallback_tensors": fallbacks, "params": params,
            "seconds": seconds, "verification": verification}
    return Exported(serve_model=serve, serve_lora=lora, info=info)


def _checkpoint_to_gguf(hf_dir: Path, final: Path, quant: str, reference: list[Reference], tokenizer,
                        cfg: ExportSettings, step, model_name: str | None = None) -> tuple[Path, int, dict | None]:
    """HF checkpoint -> F16 GGUF -> `quant` at `final`. A quantized target has its F16 intermediate verified
    first, where exact agreement holds. Returns the file, the k-quant fallback count, the F16 verification.
    `model_name` is the GGUF's general.name (else the converter takes the folder's name): llama.cpp decides
    some tokenizer behaviour by it (Phi-3's special tokens strip the whitespace after them only in a model
    whose name says phi3), so an iteration keeps its base model's name, not "Merged"."""
    f16 = convert_hf_to_gguf(hf_dir, final.with_name(f"{final.stem}-f16.gguf"), model_name=model_name)
    step("convert")
    f16_verification, fallbacks = None, 0
    if cfg.verify != "off" and quant != "F16":
        f16_verification = verify(f16, [], reference, tokenizer, "F16", cfg.verify, cfg.verify_tokens, cfg.near_tie)
        step("verify_f16")
    if quant == "F16":
        os.replace(f16, final)
    else:
        fallbacks = quantize(f16, final, quant).fallback_tensors
        f16.unlink()
    step("quantize")
    return final, fallbacks, f16_verification


def export_base(hf_dir: Path, out: Path, quant: str, model_name: str | None = None) -> dict:
    """A base model as isara serves it, made the way every iteration's model is: its HF checkpoint converted
    to F16 (verified strictly against the checkpoint), then quantized (agreement recorded). The base and the
    iterations then share a weight type, so what separates their answers is training, not quantization.
    Returns the verification."""
    cfg = _Strict(quant)
    quant = quant.upper()
    reference, tokenizer = checkpoint_reference(hf_dir, cfg.verify_tokens)
    _, _, f16_verification = _checkpoint_to_gguf(hf_dir, out, quant, reference, tokenizer, cfg, lambda name: None,
                                                 model_name)
    verification = verify(out, [], reference, tokenizer, quant, cfg.verify, cfg.verify_tokens, cfg.near_tie)
    return with_f16(verification, f16_verification)
