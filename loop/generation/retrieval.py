"""Retrieval: embed domain samples once, keep them in a USearch index, pick demos.

The index (cosine, f16) holds every known sample's question: seeds, then
accepted generated samples as they are accepted, then the optional pool. It
lives in the run folder (`index.usearch`, with `index.items.jsonl` mapping keys
to samples) and grows incrementally; a resumed run reopens it instead of
re-embedding. The two files are saved atomically and checked against each
other on open; if they disagree the caller rebuilds from the sample files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from server.tempfiles import temp_name

from loop.data import Sample, read_jsonl, write_jsonl_atomic


class Embedder:
    """A sentence-transformers embedding model (all-MiniLM-L6-v2 by default), from a local folder only: run by
    llama.cpp from a GGUF made once (server/embed.py: 0.2 s to start against sentence-transformers' 5 s of
    imports), or by sentence-transformers when the folder's pipeline is one llama.cpp can't run (`why_not`)."""

    def __init__(self, model_dir: Path):
        from server.embed import LlamaEmbedder, embedder_gguf, max_seq_length

        gguf, self.why_not = embedder_gguf(Path(model_dir))
        if gguf is not None:
            self._llama = LlamaEmbedder(gguf, ctx=max_seq_length(Path(model_dir)))
            self.dim = self._llama.dim
            self.backend = "llama.cpp"
            return
        self._llama = None
        self.backend = "sentence-transformers"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True,
                                         trust_remote_code=False)
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._llama is not None:
            return self._llama.embed(texts)
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)

    def encode_each(self, texts: list[str]) -> np.ndarray:
        """One text per call, as generation embeds its questions: texts batched together may move the last
        bits of a vector, and a resumed run must index the very vectors it lost."""
        return np.stack([self.encode([t])[0] for t in texts]) if texts else self.encode([])


class DomainIndex:
    """Questions of known samples, searchable by meaning; key i is items[i]."""

    def __init__(self, folder: Path, dim: int):
        from usearch.index import Index

        self.path = folder / "index.usearch"
        self.items_path = folder / "index.items.jsonl"
        self.dim = dim
        self.index = Index(ndim=dim, metric="cos", dtype="f16")
        self.items: list[dict] = []
        self._ids: set[str] = set()

    @classmethod
    def open(cls, folder: Path, dim: int) -> "DomainIndex":
        """Reopen the saved index; an empty one if absent or inconsistent (caller re-adds)."""
        idx = cls(folder, dim)
        if idx.path.exists() and idx.items_path.exists():
            items = read_jsonl(idx.items_path, repair=False)
            idx.index.load(str(idx.path))
            if len(idx.index) == len(items) and idx.index.ndim == dim:
                idx.items = items
                idx._ids = {it["id"] for it in items}
            else:
                idx.index = cls(folder, dim).index
        return idx

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._ids

    def add(self, samples: list[Sample], vectors: np.ndarray) -> None:
        new = [(s, v) for s, v in zip(samples, vectors) if s.id not in self._ids]
        if not new:
            return
        keys = np.arange(len(self.items), len(self.items) + len(new), dtype=np.uint64)
        self.index.add(keys, np.stack([v for _, v in new]))
        for s, _ in new:
            self.items.append({"id": s.id, "source": s.source, "prompt": s.prompt, "response": s.response})
            self._ids.add(s.id)

    def save(self) -> None:
        # items first, index second: an index that is newer than its items fails the size check and is rebuilt.
        write_jsonl_atomic(self.items_path, self.items)
        tmp = temp_name(self.path)
        self.index.save(str(tmp))
        os.replace(tmp, self.path)

    def search(self, vector: np.ndarray, count: int) -> list[tuple[int, float]]:
        """(key, cosine similarity), best first."""
        if not self.items:
            return []
        m = self.index.search(vector, min(count, len(self.items)))
        return [(int(k), 1.0 - float(d)) for k, d in zip(m.keys, m.distances)]

    def vector(self, key: int) -> np.ndarray:
        return np.asarray(self.index.get(np.uint64(key)), dtype=np.float32)

    def nearest_question(self, vector: np.ndarray) -> tuple[dict | None, float]:
        hits = self.search(vector, 1)
        return (self.items[hits[0][0]], hits[0][1]) if hits else (None, 0.0)

    def demos(self, vector: np.ndarray, k: int, *, mmr_lambda: float = 0.7, max_similarity: float = 0.95,
              pool_penalty: float = 0.05, exclude_ids: frozenset = frozenset()) -> list[dict]:
        """k demos for a query.

        Diversity: maximal marginal relevance over the 4k nearest candidates
        (score = lambda x relevance - (1 - lambda) x max similarity to the demos
        already chosen), and a hard cap: two demos more similar than
        `max_similarity` are never shown together (near-identical demos waste
        context and push the model to copy). Pool samples count `pool_penalty`
        less relevant, so domain samples win when they are close.
        """
        hits = [(key, sim - (pool_penalty if self.items[key]["source"] == "pool" else 0.0))
                for key, sim in self.search(vector, 4 * k + len(exclude_ids))
                if self.items[key]["id"] not in exclude_ids]
        if not hits:
            return []
        keys = np.array([h[0] for h in hits], dtype=np.uint64)
        vecs = np.asarray(self.index.get(keys), dtype=np.float32).reshape(len(keys), self.dim)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
        relevance = np.array([h[1] for h in hits])
        chosen: list[int] = []
        while len(chosen) < k:
            best, best_score = None, -np.inf
            for i in range(len(hits)):
                if i in chosen:
                    continue
                redundancy = max((float(vecs[i] @ vecs[j]) for j in chosen), default=0.0)
                if redundancy > max_similarity:
                    continue
                score = mmr_lambda * relevance[i] - (1 - mmr_lambda) * redundancy
                if score > best_score:
                    best, best_score = i, score
            if best is None:
                break
            chosen.append(best)
        return [self.items[hits[i][0]] for i in chosen]

    def questions(self) -> list[str]:
        return [it["prompt"] for it in self.items]


def ensure_indexed(index: DomainIndex, embedder: Embedder, samples: list[Sample], each: bool = False) -> int:
    """Embed and add the samples the index does not hold yet; returns how many were added. `each`: one text
    per call, as generation embedded them (a resumed run must index the very vectors it lost)."""
    missing = [s for s in samples if s.id not in index]
    if missing:
        texts = [s.retrieval_text() for s in missing]
        index.add(missing, embedder.encode_each(texts) if each else embedder.encode(texts))
    return len(missing)
