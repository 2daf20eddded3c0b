"""`isara doctor`: what is installed, where, which backends will serve and train,
and for everything missing, the command that fixes it. Imports nothing heavy:
versions come from package metadata, not from importing torch or Unsloth."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import sys

from server.toolchain import (LLAMA_CPP_PYTHON_VERSION, TORCH_VERSION, cuda_available, find_toolchain,
                              toolchain_dir, variant)

from loop.models.store import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER, is_pulled, load_catalog, models_dir


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def checks() -> list[dict]:
    """Rows of (what, ok, detail, fix). `ok` is True; False when something required is missing (the
    doctor fails); None when something optional or recommended is absent (a warning, with its fix if any)."""
    rows = []

    def add(what, ok, detail, fix=""):
        rows.append({"what": what, "ok": ok, "detail": detail, "fix": "" if ok else fix})

    def optional(what, present, detail, fix):
        """Absent, it is a warning (ok None) with its fix, never a failure: isara works without it."""
        add(what, True if present else None, detail, fix)

    add("python", sys.version_info >= (3, 11), f"{platform.python_version()} at {sys.executable}",
        "use Python 3.11 or newer")
    cuda = cuda_available()
    add("accelerator", True, "CUDA GPU" if cuda else f"CPU only ({platform.machine()})")
    torch_v = _version("torch")
    torch_cuda = "+cpu" not in (torch_v or "") and cuda
    add("torch", torch_v is not None and torch_v.split("+")[0] == TORCH_VERSION,
        f"{torch_v or 'missing'}" + (" (CUDA build)" if torch_cuda else ""), "make setup")
    llama_v = _version("llama_cpp_python")
    add("llama-cpp-python", llama_v == LLAMA_CPP_PYTHON_VERSION, llama_v or "missing",
        "make setup  (or: python -m server.toolchain binding)")
    tc = find_toolchain()
    add("llama-server", tc is not None, str(tc.llama_server) if tc else f"not built in {toolchain_dir()}",
        "make setup  (or: python -m server.toolchain build)")
    add("llama-quantize", tc is not None, str(tc.llama_quantize) if tc else "not built", "make setup")
    add("GGUF converters", tc is not None, str(tc.convert_hf.parent) if tc else "not gathered", "make setup")
    # Recommended only: without ccache a rebuild of llama.cpp takes minutes instead of seconds, nothing fails.
    ccache = shutil.which("ccache")
    optional("ccache", ccache, ccache or "not installed (recommended: rebuilds take minutes without it)",
             "apt-get install ccache")
    unsloth = importlib.util.find_spec("unsloth") is not None
    optional("unsloth", unsloth, _version("unsloth") or "not installed (optional; GPU training)",
             "pip install -e '.[unsloth]'" if cuda else "")
    catalog = load_catalog()
    for name in (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER):
        ok = is_pulled(name)
        add(f"model {name}", ok, str(models_dir() / name) if ok else "not pulled", f"isara models pull {name}")
    extra = [n for n in catalog if n not in (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDER) and is_pulled(n)]
    for name in extra:
        add(f"model {name}", True, str(models_dir() / name))

    serve = "llama-server (native, continuous batching)" if tc else (
        "llama_cpp.server (fallback: one request at a time)" if llama_v else "none")
    train = ("unsloth (CUDA)" if cuda and unsloth else "PEFT loop (CUDA)" if cuda else "PEFT loop (CPU)")
    add("serving backend", serve != "none", serve, "make setup")
    add("training backend", torch_v is not None, train, "make setup")
    add("build flavour", True, f"{variant()} (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})")
    return rows


def healthy(rows: list[dict]) -> bool:
    return all(r["ok"] is not False for r in rows)
