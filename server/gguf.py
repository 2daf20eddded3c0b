"""GGUF files: check them, read their metadata, convert to them, quantize them.

Conversion runs llama.cpp's own converter scripts (from the pinned sdist, see
`server.toolchain`) in a subprocess: they put their vendored `gguf-py` first on
`sys.path`, which the older PyPI `gguf` package would otherwise shadow.
Every output is written to a temporary name in the target folder and moved into
place, so a GGUF that exists is whole.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from server.children import run_tied
from server.errors import BadInput, BadModelFile, ToolFailed
from server.tempfiles import temp_name
from server.toolchain import find_toolchain, require_toolchain

GGUF_MAGIC = b"GGUF"

# Names accepted by `quantize`, with llama.cpp's ftype ids (used by the Python fallback).
QUANT_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}

# ggml tensor types: (block size in elements, bytes per block). Enough to find a
# truncated file; an unknown type just skips the size check.
_GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict = field(repr=False)
    tensor_count: int
    size: int
    params: int = 0  # elements over all tensors

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def eos_token_id(self) -> int | None:
        return self.metadata.get("tokenizer.ggml.eos_token_id")

    @property
    def vocab_size(self) -> int | None:
        """Tokens in the vocabulary (read with or without keep_arrays)."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            return len(tokens)
        text = str(tokens or "")  # skipped arrays read as "<array of N>"
        return int(text[len("<array of "):-1]) if text.startswith("<array of ") else None

    @property
    def quant(self) -> str:
        """The weight type the file was written as (general.file_type), by its llama-quantize name."""
        ftype = self.metadata.get("general.file_type")
        names = {v: k for k, v in QUANT_TYPES.items()} | {0: "F32", 32: "BF16"}
        return names.get(ftype, f"ftype-{ftype}")


class _Reader:
    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise BadModelFile(f"{self.path} is truncated inside its header: re-download or re-export it")
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise BadModelFile(f"{self.path} has a corrupt header (string of {n} bytes): re-download or re-export it")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if n > self.size:
                raise BadModelFile(f"{self.path} has a corrupt header (array of {n}): re-download or re-export it")
            if not keep_arrays and etype in _SCALARS:  # token scores etc.: skip, don't build lists
                self.f.seek(n * struct.calcsize(_SCALARS[etype]), os.SEEK_CUR)
                return f"<array of {n}>"
            if not keep_arrays and etype == _STRING:  # the vocabulary: skip each string
                for _ in range(n):
                    self.f.seek(self.unpack("<Q"), os.SEEK_CUR)
                return f"<array of {n}>"
            items = [self.value(etype, keep_arrays) for _ in range(n)]
            return items if keep_arrays else f"<array of {n}>"
        raise BadModelFile(f"{self.path} has an unknown metadata type {vtype}: re-download or re-export it")


def read_gguf(path: str | Path, keep_arrays: bool = False) -> GGUFInfo:
    """Parse the header and check the file holds every tensor it declares.

    Raises BadModelFile with a one-line fix for a missing, empty, foreign or
    truncated file, so a server is never started on one.
    """
    path = Path(path)
    if not path.exists():
        raise BadModelFile(f"model file {path} does not exist: check the path or run `isara models pull`")
    if not path.is_file():
        raise BadModelFile(f"{path} is not a file: give the path of a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise BadModelFile(f"{path} is not a GGUF file (starts with {magic!r}): give a .gguf model, "
                               "or an HF folder (`isara models add FOLDER` makes its GGUF)")
        r = _Reader(f, size, path)
        version = r.unpack("<I")
        if version not in (2, 3):
            raise BadModelFile(f"{path} has GGUF version {version}, which this llama.cpp can't read: re-export it")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"), keep_arrays)
        end = params = 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            ttype, offset = r.unpack("<I"), r.unpack("<Q")
            count = 1
            for d in dims:
                count *= d
            params += count
            if ttype in _GGML_TYPE_SIZES:
                block, nbytes = _GGML_TYPE_SIZES[ttype]
                end = max(end, offset + count // block * nbytes)
        align = int(meta.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
    if data_start + end > size:
        raise BadModelFile(f"{path} is truncated ({size} of {data_start + end} bytes): "
                           "re-download or re-export it")
    return GGUFInfo(path=path, version=version, metadata=meta, tensor_count=n_tensors, size=size, params=params)


def _atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return temp_name(out)


# How the converters (numpy's memmap, safetensors) and llama-quantize say the disk is full.
_DISK_FULL = ("No space left on device", "Not enough free space to write")


def _run_tool(cmd: list[str], what: str, tmp: Path, out: Path) -> str:
    proc = run_tied(cmd, capture_output=True, text=True)  # a killed isara takes the tool with it
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        if any(text in log for text in _DISK_FULL):  # the disk, not the tool: the caller's one line says so
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
        lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
        reason = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        err = ToolFailed(f"{what} failed: {reason}")
        err.log = log
        raise err
    os.replace(tmp, out)
    return log


def _check_hf_folder(hf_dir: Path) -> None:
    if not (hf_dir / "config.json").is_file():
        raise BadInput(f"{hf_dir} is not a Hugging Face model folder (no config.json): "
                       "give a folder saved with save_pretrained")
    if not any(hf_dir.glob("*.safetensors")):
        raise BadInput(f"{hf_dir} has no .safetensors weights: isara loads safetensors only; "
                       "re-save the model with safe_serialization=True")


def convert_hf_to_gguf(hf_dir: str | Path, out: str | Path, outtype: str = "f16",
                       model_name: str | None = None) -> Path:
    """HF folder (safetensors) -> GGUF with llama.cpp's converter. Returns `out`. `model_name`: the GGUF's
    general.name (default: the converter's, from the folder's name)."""
    hf_dir, out = Path(hf_dir), Path(out)
    _check_hf_folder(hf_dir)
    tc = require_toolchain()
    tmp = _atomic_target(out)
    name = ["--model-name", model_name] if model_name else []
    try:
        _run_tool([sys.executable, str(tc.convert_hf), str(hf_dir), "--outtype", outtype, "--outfile", str(tmp),
                   *name], f"convert_hf_to_gguf.py on {hf_dir}", tmp, out)
    except ToolFailed as e:
        # The converter knows a byte-level BPE vocabulary only by the hash of how it splits a test text.
        if "pre-tokenizer was not recognized" in str(e):
            raise BadInput(f"{hf_dir} has a tokenizer llama.cpp's converter does not know (its BPE pre-tokenizer "
                           "is not one llama.cpp implements), so no GGUF can serve it: use a model of a family "
                           "llama.cpp supports with its own tokenizer, or give a GGUF of it") from None
        raise
    return out


def set_chat_template(src: str | Path, out: str | Path, template: str) -> Path:
    """A copy of the GGUF `src` at `out` whose tokenizer.chat_template is `template` (gguf-py's
    gguf_new_metadata script; the tensors are copied as they are)."""
    src, out = Path(src), Path(out)
    tc = require_toolchain()
    script = tc.convert_hf.parent / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    tmp = _atomic_target(out)
    template_file = tmp.with_name(tmp.name + ".jinja")
    template_file.write_text(template, encoding="utf-8")
    try:
        _run_tool([sys.executable, str(script), str(src), str(tmp), "--chat-template-file", str(template_file),
                   "--force"], f"gguf_new_metadata.py on {src}", tmp, out)
    finally:
        template_file.unlink(missing_ok=True)
    return out


def convert_lora_to_gguf(adapter_dir: str | Path, base_hf_dir: str | Path, out: str | Path,
                         outtype: str = "f16") -> Path:
    """PEFT adapter folder -> LoRA GGUF; `--base` is the local HF folder (never the Hub)."""
    adapter_dir, base_hf_dir, out = Path(adapter_dir), Path(base_hf_dir), Path(out)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise BadInput(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    _check_hf_folder(base_hf_dir)
    tc = require_toolchain()
    tmp = _atomic_target(out)
    _run_tool([sys.executable, str(tc.convert_lora), str(adapter_dir), "--base", str(base_hf_dir),
               "--outtype", outtype, "--outfile", str(tmp)],
              f"convert_lora_to_gguf.py on {adapter_dir}", tmp, out)
    return out


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    fallback_tensors: int  # tensors kept in another type (K-quants need rows divisible by 256)
    log: str = field(repr=False, default="")


def quantize(src: str | Path, out: str | Path, qtype: str = "Q8_0", threads: int | None = None) -> QuantizeResult:
    """Quantize a GGUF with llama-quantize (or the Python binding when it is not built)."""
    src, out = Path(src), Path(out)
    qtype = qtype.upper()
    if qtype not in QUANT_TYPES:
        raise BadInput(f"unknown quantization {qtype!r}: use one of {', '.join(QUANT_TYPES)}")
    read_gguf(src)
    tmp = _atomic_target(out)
    tc = find_toolchain()
    if tc is not None:
        cmd = [str(tc.llama_quantize), str(src), str(tmp), qtype]
        if threads:
            cmd.append(str(threads))
        log = _run_tool(cmd, f"llama-quantize {qtype} on {src}", tmp, out)
    else:
        log = _quantize_with_binding(src, tmp, out, qtype)
    fallbacks = sum(1 for ln in log.splitlines() if "fallback" in ln.lower())
    return QuantizeResult(path=out, qtype=qtype, fallback_tensors=fallbacks, log=log)


def _quantize_with_binding(src: Path, tmp: Path, out: Path, qtype: str) -> str:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ToolFailed(f"llama_model_quantize {qtype} on {src} failed with code {rc}")
    os.replace(tmp, out)
    return ""
