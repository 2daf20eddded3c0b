"""Retrieval: the run's demo index (USearch, cosine, f16) against exact NumPy search.

Measures query latency and recall@k at 1k, 10k and 100k items of 384
dimensions (the embedder's), on clustered vectors like sentence embeddings of
one domain; and the index's build time.
"""

from __future__ import annotations

import time


def bench_retrieval(sizes=(1_000, 10_000, 100_000), dim: int = 384, queries: int = 200, k: int = 8,
                    seed: int = 0, log=print) -> list[dict]:
    """USearch (the run's index settings: cosine, f16) vs exact NumPy search: latency and recall@k.

    Vectors are clustered (like sentence embeddings of one domain), not uniform noise, on which
    approximate search is unrealistically easy or hard."""
    import numpy as np
    from usearch.index import Index

    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        centers = rng.standard_normal((max(8, n // 100), dim)).astype(np.float32)
        data = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        q = data[rng.integers(0, n, queries)] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t0 = time.perf_counter()
        index = Index(ndim=dim, metric="cos", dtype="f16")
        index.add(np.arange(n), data)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = [index.search(v, k).keys for v in q]
        us = (time.perf_counter() - t0) / queries
        t0 = time.perf_counter()
        exact = [np.argpartition(-(data @ v), k)[:k] for v in q]
        np_s = (time.perf_counter() - t0) / queries
        recall = float(np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact)]))
        row = {"items": n, "dim": dim, "k": k, "usearch_ms": round(us * 1000, 3), "numpy_ms": round(np_s * 1000, 3),
               "speedup": round(np_s / us, 1), "recall_at_k": round(recall, 4), "usearch_build_s": round(build, 2)}
        rows.append(row)
        log(f"retrieval {n:>7d} items: usearch {row['usearch_ms']:.3f} ms, numpy {row['numpy_ms']:.3f} ms "
            f"({row['speedup']}x), recall@{k} {row['recall_at_k']:.3f}")
    return rows
