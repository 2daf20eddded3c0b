"""Retrieval: the run's embedder, and its demo index (USearch, cosine, f16) against exact NumPy search.

The embedder on llama.cpp (what a run uses) against sentence-transformers on the same folder and texts,
each in a fresh process, since what differs most is the start (imports, load): seconds to start, ms per text
embedded one at a time (as generation embeds), and the cosine between the two backends' vectors.

The index: query latency and recall@k at 1k, 10k and 100k items of 384
dimensions (the embedder's), on clustered vectors like sentence embeddings of
one domain; and the index's build time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# Run in a fresh interpreter per backend: argv is the backend and the folder, stdin the texts as JSON.
_PROBE = """
import json, sys, time
t0 = time.perf_counter()
backend, folder, texts = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
if backend == "llama.cpp":
    from pathlib import Path
    from server.embed import LlamaEmbedder, embedder_gguf, max_seq_length
    gguf, why_not = embedder_gguf(Path(folder))
    embed = LlamaEmbedder(gguf, max_seq_length(Path(folder))).embed
else:
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(folder, device="cpu", local_files_only=True, trust_remote_code=False)
    embed = lambda batch: model.encode(batch, normalize_embeddings=True)
start = time.perf_counter() - t0
t0 = time.perf_counter()
vectors = [embed([t])[0].tolist() for t in texts]
print(json.dumps({"start_s": start, "per_text_ms": (time.perf_counter() - t0) / len(texts) * 1000,
                  "vectors": vectors}))
"""


def bench_embedders(folder: Path, texts: list[str], log=print) -> dict:
    """The embedder folder on llama.cpp and on sentence-transformers, each started in a fresh process."""
    import numpy as np

    from server.embed import embedder_gguf

    embedder_gguf(folder)  # made before the clock starts: once per machine, not a start's cost
    out, vectors = {}, {}
    for backend in ("llama.cpp", "sentence-transformers"):
        proc = subprocess.run([sys.executable, "-c", _PROBE, backend, str(folder)], input=json.dumps(texts),
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        if proc.returncode != 0:
            raise RuntimeError(f"embedding with {backend} failed: {proc.stderr.strip().splitlines()[-1:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        vectors[backend] = np.asarray(r.pop("vectors"), dtype=np.float32)
        out[backend] = {k: round(v, 3) for k, v in r.items()}
    cos = (vectors["llama.cpp"] * vectors["sentence-transformers"]).sum(axis=1)
    out["texts"] = len(texts)
    out["start_ratio"] = round(out["sentence-transformers"]["start_s"] / out["llama.cpp"]["start_s"], 1)
    out["min_cosine"] = round(float(cos.min()), 6)
    log(f"embedder: llama.cpp starts in {out['llama.cpp']['start_s']} s, sentence-transformers in "
        f"{out['sentence-transformers']['start_s']} s ({out['start_ratio']}x); per text "
        f"{out['llama.cpp']['per_text_ms']} vs {out['sentence-transformers']['per_text_ms']} ms; vectors agree "
        f"to a cosine of {out['min_cosine']} or more over {len(texts)} texts")
    return out


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
