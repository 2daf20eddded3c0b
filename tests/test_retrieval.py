"""The USearch index over domain samples, with the real all-MiniLM-L6-v2 embedder."""

from __future__ import annotations

import numpy as np
import pytest

from loop.data import Sample
from loop.generation.retrieval import DomainIndex, Embedder, ensure_indexed


@pytest.fixture(scope="module")
def embedder():
    from loop.models.store import DEFAULT_EMBEDDER, is_pulled, resolve_model

    if not is_pulled(DEFAULT_EMBEDDER):
        pytest.fail(f"{DEFAULT_EMBEDDER} is not pulled: run `make setup`")
    return Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir)


def S(i, q, source="seed"):
    return Sample(id=f"{source[0]}-{i}", prompt=q, response=f"answer {i}", source=source)


SEEDS = [S(0, "How often should I water tomato plants?"), S(1, "When is the best time to plant garlic?"),
         S(2, "How do I make compost at home?"), S(3, "What vegetables grow well in shade?"),
         S(4, "How do I keep slugs off my lettuce?"), S(5, "When should I prune roses?")]


def test_embeddings_are_normalized_and_meaningful(embedder):
    v = embedder.encode(["How do I water tomatoes?", "Watering tomato plants", "The stock market fell today"])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


TEXTS = ["How often should I water tomato plants?", "Watering tomato plants", "The stock market fell today",
         "How do I pick a lock?", "Write a short poem about the sea, in four lines, each of them rhyming."]


def test_the_default_embedder_runs_on_llama_cpp_with_sentence_transformers_vectors(embedder):
    from sentence_transformers import SentenceTransformer

    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    assert embedder.backend == "llama.cpp" and embedder.why_not is None
    reference = SentenceTransformer(str(resolve_model(DEFAULT_EMBEDDER).embedder_dir), device="cpu",
                                    local_files_only=True).encode(TEXTS, normalize_embeddings=True)
    ours = embedder.encode_each(TEXTS)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert (ours * reference).sum(axis=1).min() > 0.9999  # measured 0.9999993


def test_a_text_past_the_models_length_is_cut_as_sentence_transformers_cuts_it(embedder):
    from sentence_transformers import SentenceTransformer

    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    long = " ".join(TEXTS * 30)  # ~500 tokens: past the 256 sentence-transformers keeps, and the 512 positions
    reference = SentenceTransformer(str(resolve_model(DEFAULT_EMBEDDER).embedder_dir), device="cpu",
                                    local_files_only=True).encode([long], normalize_embeddings=True)
    assert float(embedder.encode([long])[0] @ reference[0]) > 0.999  # measured 0.9992: the same 256 tokens cut


def test_a_pipeline_llama_cpp_does_not_apply_is_embedded_by_sentence_transformers(tmp_path):
    """all-MiniLM-L6-v2 with a max pooling: a sentence-transformers pipeline llama.cpp has no pooling for."""
    import json
    import shutil

    from loop.models.store import DEFAULT_EMBEDDER, resolve_model
    from server.embed import llama_cpp_pipeline

    folder = tmp_path / "max-pooled"
    shutil.copytree(resolve_model(DEFAULT_EMBEDDER).embedder_dir, folder)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}))
    assert "max_tokens" in llama_cpp_pipeline(folder)
    e = Embedder(folder)
    assert e.backend == "sentence-transformers" and "max_tokens" in e.why_not
    v = e.encode(TEXTS[:3])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3) and v[0] @ v[1] > v[0] @ v[2]


def test_nearest_neighbours_are_the_related_samples(embedder, tmp_path):
    idx = DomainIndex(tmp_path, embedder.dim)
    ensure_indexed(idx, embedder, SEEDS)
    demos = idx.demos(embedder.encode(["How much water do tomatoes need?"])[0], k=2)
    assert demos[0]["id"] == "s-0"


def test_index_is_saved_and_reopened_without_re_embedding(embedder, tmp_path):
    idx = DomainIndex(tmp_path, embedder.dim)
    ensure_indexed(idx, embedder, SEEDS)
    idx.save()
    again = DomainIndex.open(tmp_path, embedder.dim)
    assert len(again) == len(SEEDS)
    assert ensure_indexed(again, embedder, SEEDS) == 0
    assert again.demos(embedder.encode(["pruning roses"])[0], k=1)[0]["id"] == "s-5"


def test_an_index_that_disagrees_with_its_items_is_rebuilt(embedder, tmp_path):
    idx = DomainIndex(tmp_path, embedder.dim)
    ensure_indexed(idx, embedder, SEEDS)
    idx.save()
    lines = (tmp_path / "index.items.jsonl").read_text().splitlines()
    (tmp_path / "index.items.jsonl").write_text("\n".join(lines[:3]) + "\n")
    again = DomainIndex.open(tmp_path, embedder.dim)
    assert len(again) == 0
    assert ensure_indexed(again, embedder, SEEDS) == len(SEEDS)


def test_near_identical_demos_are_never_shown_together(embedder, tmp_path):
    twins = SEEDS + [S(10, "How often should I water tomato plants?!"), S(11, "how often should i water tomato plants")]
    idx = DomainIndex(tmp_path, embedder.dim)
    ensure_indexed(idx, embedder, twins)
    demos = idx.demos(embedder.encode(["watering tomato plants"])[0], k=3, max_similarity=0.95)
    tomato = [d for d in demos if "tomato" in d["prompt"].lower()]
    assert len(tomato) == 1


def test_pool_samples_yield_to_domain_samples_when_close(embedder, tmp_path):
    idx = DomainIndex(tmp_path, embedder.dim)
    ensure_indexed(idx, embedder, [S(0, "How often should I water tomato plants?"),
                                   S(1, "How often should I water my tomato plants?", source="pool"),
                                   S(2, "When should I prune roses?")])
    q = embedder.encode(["How often should I water my tomato plants?"])[0]
    assert idx.demos(q, k=1, pool_penalty=0.0)[0]["source"] == "pool"
    assert idx.demos(q, k=1, pool_penalty=0.2)[0]["source"] == "seed"


def test_the_papers_stage_one_draws_whole_pairs_at_random_from_every_known_sample(tmp_path):
    """generation.question_demos = "random_pairs": k pairs drawn uniformly from seeds and accepted samples,
    the same for the same request seed; no nearness involved."""
    from loop.config import load_config
    from loop.generation.generate import GenerationPhase

    index = DomainIndex(tmp_path, 8)
    samples = [S(i, f"q{i}", source="seed" if i < 6 else "generated") for i in range(12)]
    index.add(samples, np.eye(8, dtype=np.float32)[[i % 8 for i in range(12)]])
    cfg = load_config(None, ['generation.question_demos="random_pairs"', "retrieval.k=4", 'data.seeds="s.jsonl"'])
    phase = GenerationPhase(cfg=cfg, iteration=1, out_dir=tmp_path, index=index, embedder=None, client=None,
                            anchors=list(range(6)), events=None)
    draws = [phase._random_demos(seed) for seed in range(40)]
    assert all(len({d["id"] for d in demos}) == 4 for demos in draws)
    assert [d["id"] for d in phase._random_demos(7)] == [d["id"] for d in draws[7]]
    assert {d["id"] for demos in draws for d in demos} == {s.id for s in samples}  # generated ones too
