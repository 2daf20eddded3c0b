"""The machine, and the bounds it sets on decoding.

Measures memory bandwidth (a 256 MiB copy, best of 5) and float32 matrix-multiply
FLOP/s (1024 x 1024 in torch, best of 5; bf16 too, the bound of CPU training), the
two limits of decoding: batch-1
decode reads every weight once a token, so it can go no faster than bandwidth /
model bytes; batched decode does 2 x parameters FLOP a token, so no faster than
FLOP/s / (2 x parameters). Each generation row's share of its bound is set here
(`share_of_bound`): how far an engine is from what the hardware allows.
"""

from __future__ import annotations

import platform
import time

import psutil

from server.toolchain import cuda_available


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, Python, GPU."""
    return {"cpu": _cpu_name(), "cores_logical": psutil.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "gpu": "CUDA" if cuda_available() else "none"}


def machine_limits(threads: int | None = None) -> dict:
    """Memory bandwidth (a large copy) and matrix-multiply FLOP/s, the two bounds of decoding:
    batch-1 decode reads every weight once a token (bandwidth / model bytes); batched decode does
    2 x parameters FLOP a token (FLOP/s / (2 x parameters))."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    src = np.ones(256 * 2**20 // 8)  # 256 MiB, far beyond the caches
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * src.nbytes / best  # read + write
    return {"memory_gb_s": round(bandwidth / 1e9, 1), "matmul_gflop_s_f32": _matmul_gflop_s(torch.float32),
            "matmul_gflop_s_bf16": _matmul_gflop_s(torch.bfloat16), "matmul_gop_s_int8": _int8_gop_s(),
            "torch_threads": torch.get_num_threads()}


def _int8_gop_s() -> float | None:
    """int8 x int8 -> int32 matmuls (torch._int_mm; VNNI where the CPU has it): the units llama.cpp's Q8_0
    dot products run on, so the honest bound for generation at Q8_0. None where this torch has no CPU int8
    matmul."""
    import torch

    try:
        a = torch.randint(-128, 128, (1024, 1024), dtype=torch.int8)
        b = torch.randint(-128, 128, (1024, 1024), dtype=torch.int8)
        torch._int_mm(a, b)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return _rate_of(lambda: torch._int_mm(a, b))


def _matmul_gflop_s(dtype) -> float:
    """Matmuls in torch (bf16: what CPU autocast training runs its matmuls in)."""
    import torch

    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    return _rate_of(lambda: a @ b)


def _rate_of(matmul) -> float:
    """G(FL)OP/s of a 1024 x 1024 x 1024 matmul: one warm-up, then the best of 5 rounds of 4."""
    matmul()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            matmul()
        best = min(best, (time.perf_counter() - t0) / 4)
    return round(2 * 1024**3 / best / 1e9, 1)


def bounds(limits: dict, model_bytes: int, params: int) -> dict:
    """Batch-1 decode: bandwidth over the model's bytes. Batched decode: matmul throughput over 2 x parameters,
    in f32 (what earlier benches stated) and in int8 (what llama.cpp's Q8_0 kernels compute in; far higher on a
    CPU with VNNI, so a share of it says how far generation really is from the hardware)."""
    int8 = limits.get("matmul_gop_s_int8")
    return {"decode_batch1_tok_s": round(limits["memory_gb_s"] * 1e9 / model_bytes, 1),
            "decode_batched_tok_s": round(limits["matmul_gflop_s_f32"] * 1e9 / (2 * params), 1),
            "decode_batched_int8_tok_s": round(int8 * 1e9 / (2 * params), 1) if int8 else None}


def share_of_bound(rows: list[dict], bound: dict) -> None:
    """Set on each generation row its speed as a share of the machine's decode bound: batch 1's at one in
    flight, the batched one's above (None without a bound: no HF checkpoint to count parameters)."""
    for r in rows:
        limit = bound.get("decode_batch1_tok_s" if r["in_flight"] == 1 else "decode_batched_tok_s")
        # three significant digits, not decimals: a small model's share is a fraction of a percent
        r["share_of_bound"] = float(f"{r['gen_tok_s'] / limit:.3g}") if limit else None
        int8 = bound.get("decode_batched_int8_tok_s") if r["in_flight"] > 1 else None
        r["share_of_int8_bound"] = float(f"{r['gen_tok_s'] / int8:.3g}") if int8 else None
