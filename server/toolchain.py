"""The llama.cpp toolchain: where it lives, how it is built, how to find it.

Everything comes from one pinned llama-cpp-python sdist, which vendors
llama.cpp's whole source: the Python binding (built into the venv), the native
`llama-server` and `llama-quantize`, and the GGUF converter scripts with their
`conversion/` and `gguf-py/` folders. One source means the binding, the server
and the converter agree on the GGUF format.

Builds live in a versioned cache outside the repository
(`$ISARA_CACHE`, default `${XDG_CACHE_HOME:-~/.cache}/isara`), so a fresh clone,
CI and the next set-up reuse them. A toolchain folder counts as built only
when its `COMPLETE` marker exists; the marker is written last, atomically, so
an interrupted build is never taken for a finished one.

This module uses the standard library only: `make setup` runs it before any
dependency is installed (`python -m server.toolchain --help`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from server.errors import ToolchainMissing
from server.tempfiles import temp_name

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TORCH_VERSION = "2.13.0"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
CONVERTER_DIRS = ("conversion", "gguf-py")
SETUP_HINT = "run `make setup`"


def cache_root() -> Path:
    if os.environ.get("ISARA_CACHE"):
        return Path(os.environ["ISARA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "isara"


def cuda_available() -> bool:
    """A usable NVIDIA GPU, not just a CUDA compiler (nvcc alone is common on CPU boxes).

    `ISARA_CUDA=0|1` overrides the detection.
    """
    forced = os.environ.get("ISARA_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def variant() -> str:
    """The build flavour; part of the cache folder name so flavours never mix."""
    return "cuda" if cuda_available() else f"cpu-{platform.machine().lower()}"


def _cpu_cmake_flags() -> list[str]:
    # Portable: never -march=native, so a cache copied to another CPU still runs.
    # AVX2/FMA/F16C cover every x86-64 CPU of the last decade.
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    return ["-DGGML_NATIVE=OFF"]


def backend_cmake_flags(flavour: str | None = None) -> list[str]:
    flavour = flavour or variant()
    return ["-DGGML_CUDA=ON"] if flavour == "cuda" else _cpu_cmake_flags()


@dataclass(frozen=True)
class Toolchain:
    root: Path
    llama_server: Path
    llama_quantize: Path
    convert_hf: Path
    convert_lora: Path
    info: dict


def toolchain_dir(flavour: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-{flavour or variant()}"


def find_toolchain(flavour: str | None = None) -> Toolchain | None:
    """The finished toolchain for this machine, or None (never a half-built one)."""
    root = Path(os.environ["ISARA_TOOLCHAIN"]) if os.environ.get("ISARA_TOOLCHAIN") else toolchain_dir(flavour)
    marker = root / "COMPLETE"
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    tc = Toolchain(
        root=root,
        llama_server=root / "bin" / "llama-server",
        llama_quantize=root / "bin" / "llama-quantize",
        convert_hf=root / "convert" / CONVERTER_FILES[0],
        convert_lora=root / "convert" / CONVERTER_FILES[1],
        info=info,
    )
    needed = [tc.llama_server, tc.llama_quantize, tc.convert_hf, tc.convert_lora]
    if not all(p.is_file() for p in needed):
        return None
    return tc


def require_toolchain() -> Toolchain:
    tc = find_toolchain()
    if tc is None:
        raise ToolchainMissing(
            f"the llama.cpp toolchain is not built in {toolchain_dir()}: {SETUP_HINT} "
            f"(or `python -m server.toolchain build`)"
        )
    return tc


# --- building ---------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[isara setup] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run(cmd, check=True, **kw)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = temp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = temp_name(dst)
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def ensure_sdist(python: str = sys.executable) -> Path:
    """Download the pinned sdist once (pip checks the registry's hash)."""
    downloads = cache_root() / "downloads"
    sdist = downloads / f"{SDIST_NAME}.tar.gz"
    if sdist.is_file():
        return sdist
    downloads.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(downloads)])
    if not sdist.is_file():
        raise ToolchainMissing(f"pip did not produce {sdist}: check that PyPI is reachable")
    return sdist


def ensure_source(python: str = sys.executable) -> Path:
    """The sdist extracted at a fixed path (a fixed path keeps ccache hits across clones)."""
    src = cache_root() / "src" / SDIST_NAME
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file() and (src / ".extracted").is_file():
        return src
    sdist = ensure_sdist(python)
    tmp = temp_name(src)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    inner = tmp / SDIST_NAME
    (inner / ".extracted").write_text(LLAMA_CPP_PYTHON_VERSION)
    shutil.rmtree(src, ignore_errors=True)
    os.replace(inner, src)
    shutil.rmtree(tmp, ignore_errors=True)
    return src


def _ccache_flags() -> list[str]:
    # ccache is recommended, never required: without it the build runs the same, only a rebuild is slower.
    return ["-DGGML_CCACHE=ON"] if shutil.which("ccache") else ["-DGGML_CCACHE=OFF"]


def build_native(python: str = sys.executable, jobs: int | None = None) -> Toolchain:
    """Build llama-server and llama-quantize and gather the converters; idempotent."""
    existing = find_toolchain()
    if existing is not None:
        _log(f"llama.cpp toolchain present: {existing.root}")
        return existing
    flavour = variant()
    root = toolchain_dir(flavour)
    src = ensure_source(python) / "vendor" / "llama.cpp"
    build = root / "build"
    root.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
          *backend_cmake_flags(flavour), *_ccache_flags(),
          # The web UI would be downloaded at build time: keep it off (offline).
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"])
    _run(["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2),
          "--target", "llama-server", "llama-quantize"])
    (root / "bin").mkdir(exist_ok=True)
    for name in ("llama-server", "llama-quantize"):
        built = build / "bin" / name
        if not built.is_file():
            raise ToolchainMissing(f"the build finished without {built}: see the cmake output above")
        _atomic_copy(built, root / "bin" / name)
    _copy_converters(src, root / "convert")
    info = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "variant": flavour,
        "cmake_flags": backend_cmake_flags(flavour),
        "llama_server_sha256": _sha256(root / "bin" / "llama-server"),
    }
    _atomic_write_text(root / "COMPLETE", json.dumps(info, indent=2) + "\n")
    _log(f"llama.cpp toolchain built: {root}")
    tc = find_toolchain(flavour)
    assert tc is not None
    return tc


def _copy_converters(src: Path, dest: Path) -> None:
    # The scripts import their siblings (`conversion/`, `gguf-py/`): keep them together.
    tmp = temp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in CONVERTER_FILES:
        shutil.copy2(src / name, tmp / name)
    for name in CONVERTER_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_torch(python: str = sys.executable) -> None:
    """torch first, so no resolver ever picks a CUDA build for a CPU machine.

    pip on this machine kind finds the CPU build on the local disk; on a CUDA
    machine PyPI's default Linux wheel (a CUDA build) is the right one.
    """
    have = _installed_version("torch")
    if have and have.split("+")[0] == TORCH_VERSION:
        _log(f"torch {have} present")
        return
    _run([python, "-m", "pip", "install", "--quiet", f"torch=={TORCH_VERSION}"])
    if not cuda_available():
        out = subprocess.run([python, "-c", "import torch; print(torch.version.cuda or '')"],
                             capture_output=True, text=True)
        if out.stdout.strip():
            _log("warning: a CUDA build of torch was installed on a machine without a GPU "
                 "(it works, but is large); install the CPU wheel to save space")


def install_binding(python: str = sys.executable) -> None:
    """llama-cpp-python from the same source, portable flags, ccache, fixed build dir."""
    if _installed_version("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION:
        _log(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} present")
        return
    flavour = variant()
    wheels = cache_root() / f"wheels-{flavour}"
    wheel = next(iter(sorted(wheels.glob(f"{SDIST_NAME}-*.whl"))), None)
    if wheel is None:
        src = ensure_source(python)
        _run([python, "-m", "pip", "install", "--quiet", "scikit-build-core>=0.9", "cmake>=3.21"])
        env = dict(os.environ)
        env["CMAKE_ARGS"] = " ".join(["-DLLAVA_BUILD=OFF", *backend_cmake_flags(flavour), *_ccache_flags()])
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        build_dir = cache_root() / f"pybuild-{LLAMA_CPP_PYTHON_VERSION}-{flavour}"
        # Our own wheel folder per flavour: pip's wheel cache ignores CMAKE_ARGS.
        tmp = temp_name(wheels)
        shutil.rmtree(tmp, ignore_errors=True)
        _run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-cache-dir",
              "-C", f"build-dir={build_dir}", "-w", str(tmp), str(src)], env=env)
        built = next(iter(tmp.glob(f"{SDIST_NAME}-*.whl")))
        wheels.mkdir(parents=True, exist_ok=True)
        os.replace(built, wheels / built.name)
        shutil.rmtree(tmp, ignore_errors=True)
        wheel = wheels / built.name
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[server]"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.toolchain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("torch", help=f"install torch=={TORCH_VERSION} (CPU or CUDA build, detected)")
    sub.add_parser("binding", help="build and install llama-cpp-python into this Python")
    sub.add_parser("build", help="build llama-server, llama-quantize; gather the converters")
    sub.add_parser("where", help="print the toolchain folder if built (exit 1 if not)")
    args = p.parse_args(argv)
    if args.cmd == "torch":
        install_torch()
    elif args.cmd == "binding":
        install_binding()
    elif args.cmd == "build":
        build_native()
    elif args.cmd == "where":
        tc = find_toolchain()
        if tc is None:
            print(f"not built: {toolchain_dir()}", file=sys.stderr)
            return 1
        print(tc.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
