"""Sentence embeddings with llama.cpp in this process (llama-cpp-python), from a GGUF of a sentence-transformers
folder that llama.cpp's converter makes once.

Why not sentence-transformers itself: importing it (torch, transformers, scipy, pandas, peft) takes about 5 s
on 2 cores, paid by every process that embeds (each `isara run`, resumed or not, and `isara eval` of held-out
seeds); llama-cpp-python is imported and the model loaded in 0.2 s. The vectors agree with
sentence-transformers' to a cosine of 0.99999 (tests/test_retrieval.py).

llama.cpp applies the pooling the converter read from the folder (`1_Pooling/config.json`) and nothing after
it, so only a folder whose pipeline is a transformer, one pooling llama.cpp has (mean, CLS or last token) and
an optional normalization is taken (`llama_cpp_pipeline`); the caller embeds any other with sentence-transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import numpy as np

from server.errors import BadInput, ToolFailed
from server.toolchain import LLAMA_CPP_PYTHON_VERSION, cache_root

_TAKEN_MODULES = {"sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                  "sentence_transformers.models.Normalize"}
_POOLINGS = ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_lasttoken")


def llama_cpp_pipeline(folder: Path) -> str | None:
    """Why llama.cpp can't embed as the sentence-transformers folder says, or None when it can."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        types = {m["type"] for m in modules}
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pooling = json.loads((folder / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration) as e:
        return f"no sentence-transformers pipeline with a pooling module ({e})"
    if not types <= _TAKEN_MODULES:
        return f"modules llama.cpp does not apply: {sorted(types - _TAKEN_MODULES)}"
    chosen = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if len(chosen) != 1 or chosen[0] not in _POOLINGS:
        return f"pooling {chosen} is not one llama.cpp has (mean, CLS or last token)"
    return None


def max_seq_length(folder: Path, default: int = 512) -> int:
    """The token count sentence-transformers cuts a text to (sentence_bert_config.json)."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def folder_digest(folder: Path) -> str:
    """sha256 over every file of the folder (relative names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def embedder_gguf(folder: Path) -> tuple[Path | None, str | None]:
    """The folder's F32 GGUF in the build cache (made once for every checkout: 5 s for all-MiniLM-L6-v2), or
    None and why llama.cpp can't embed it (also kept, so a folder is tried once)."""
    folder = Path(folder)
    why = llama_cpp_pipeline(folder)
    if why is not None:
        return None, why
    d = cache_root() / "embedders" / f"{folder_digest(folder)[:16]}-llama.cpp{LLAMA_CPP_PYTHON_VERSION}"
    gguf, refused = d / "embedder.gguf", d / "REFUSED.txt"
    if gguf.is_file():
        return gguf, None
    if refused.is_file():
        return None, refused.read_text()
    from server.gguf import convert_hf_to_gguf
    from server.tempfiles import temp_name
    from server.toolchain import find_toolchain

    if find_toolchain() is None:  # not built yet: tried again once it is, nothing kept
        return None, "llama.cpp's converter is not built (make setup)"
    try:
        return convert_hf_to_gguf(folder, gguf, outtype="f32"), None
    except (ToolFailed, BadInput) as e:
        if "not supported" not in str(e):  # not the architecture: tried again next time, nothing kept
            return None, str(e)
        d.mkdir(parents=True, exist_ok=True)  # an architecture the converter does not know: kept, tried once
        tmp = temp_name(refused)
        tmp.write_text(str(e))
        os.replace(tmp, refused)
        return None, str(e)


class LlamaEmbedder:
    """L2-normalized sentence vectors from an embedding GGUF, each text cut to `ctx` tokens."""

    def __init__(self, gguf: Path, ctx: int, threads: int | None = None):
        import llama_cpp

        # A non-causal model sees a text whole in one micro-batch: batch and micro-batch hold the longest.
        self._llm = llama_cpp.Llama(model_path=str(gguf), embedding=True, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                                    n_threads=threads or os.cpu_count() or 1, verbose=False)
        self.dim = int(self._llm.n_embd())
        # Freed when dropped or, at the latest, at exit before the interpreter tears down the modules that
        # llama-cpp-python's own finalizer needs (else it prints an ignored TypeError as every process ends).
        weakref.finalize(self, self._llm.close)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._llm.embed(texts, normalize=True, truncate=True), dtype=np.float32)
