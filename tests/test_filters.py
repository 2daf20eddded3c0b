"""Each filter rejects what it should and keeps what it should."""

from __future__ import annotations

import numpy as np

from loop.config import FilterConfig
from loop.generation.filters import NearDuplicates, check_text, copied_from_demos, repeated_ngram_share

CFG = FilterConfig()


def check(text, truncated=False):
    return check_text(text, min_chars=12, max_chars=200, cfg=CFG, truncated=truncated)


def test_a_good_question_passes():
    assert check("How often should I water basil in summer?") is None


def test_unparsable_output_is_a_parse_failure():
    assert check(None) == "parse"


def test_too_short_and_too_long_are_rejected():
    assert check("Why?") == "too_short"
    assert check("word " * 60) in ("too_long", "repetition")
    assert check("A reasonable question about soil pH levels?", truncated=True) == "too_long"
    varied = " ".join(f"w{i}" for i in range(60))
    assert check(varied) == "too_long"


def test_degenerate_repetition_is_rejected_and_normal_text_kept():
    loop = "Can you provide a recipe for a recipe of a recipe of a recipe of a recipe of a recipe of a recipe"
    assert repeated_ngram_share(loop) > 0.3
    assert check(loop, truncated=True) == "repetition"
    normal = "Mulch keeps the soil moist, suppresses weeds and feeds the soil as it breaks down over the season."
    assert repeated_ngram_share(normal) == 0.0


def test_verbatim_copy_of_a_demo_is_detected_ignoring_case_and_punctuation():
    demos = ["How do I make compost at home?", "When should I prune roses?"]
    assert copied_from_demos("how do I make compost at home", demos)
    assert not copied_from_demos("How do I make compost in a flat?", demos)


class _Index:
    """The two things NearDuplicates asks of an index: nearest question and all items."""

    def __init__(self, questions, vectors):
        self.items = [{"id": f"s-{i}", "prompt": q} for i, q in enumerate(questions)]
        self.vectors = vectors

    def nearest_question(self, v):
        sims = self.vectors @ v
        i = int(np.argmax(sims))
        return self.items[i], float(sims[i])


def test_near_duplicate_by_embedding_cosine():
    idx = _Index(["How do I grow tomatoes?"], np.array([[1.0, 0.0]]))
    reason, detail = NearDuplicates(CFG).check("Totally different words", np.array([0.99, 0.141]), idx)
    assert reason == "near_duplicate" and detail["by"] == "cosine"


def test_near_duplicate_by_rouge_l_against_every_known_question():
    idx = _Index(["What is the best soil for growing carrots?", "How do I prune roses?"],
                 np.array([[1.0, 0.0], [0.0, 1.0]]))
    reason, detail = NearDuplicates(CFG).check("What is the best soil for growing onions?",
                                               np.array([0.6, 0.6]), idx)
    assert reason == "near_duplicate" and detail["by"] == "rouge_l" and detail["of"] == "s-0"


def test_a_novel_question_passes_the_duplicate_filter():
    idx = _Index(["What is the best soil for growing carrots?"], np.array([[1.0, 0.0]]))
    reason, detail = NearDuplicates(CFG).check("Which birds eat garden pests?", np.array([0.3, 0.95]), idx)
    assert reason is None and detail["max_rouge_l"] < 0.7


def test_with_the_real_embedder_and_the_default_threshold_a_reworded_question_is_a_near_duplicate(tmp_path):
    """The real MiniLM embedder and a real USearch index at the default filters.max_question_cosine: a
    reworded question is caught by the cosine, and a question of the same form on another topic passes
    (the hand-made 2-D vectors above can't show that the default threshold sits between the two)."""
    from loop.data import Sample
    from loop.generation.retrieval import DomainIndex, Embedder
    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    embedder = Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir)
    known = ["How can I grow tomatoes on my balcony?", "What is the best way to learn to play the guitar?"]
    index = DomainIndex(tmp_path, embedder.dim)
    index.add([Sample(id=f"s{i}", prompt=q, response="...", source="seed") for i, q in enumerate(known)],
              embedder.encode(known))
    reworded, other = "How do I grow tomatoes on a balcony?", "How can I grow my savings on a small salary?"
    reason, detail = NearDuplicates(CFG).check(reworded, embedder.encode([reworded])[0], index)
    assert reason == "near_duplicate" and detail["by"] == "cosine", detail
    reason, detail = NearDuplicates(CFG).check(other, embedder.encode([other])[0], index)
    assert reason is None, detail
