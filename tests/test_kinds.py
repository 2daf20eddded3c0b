"""Answer kinds from the seeds alone, the class-balanced neighbour vote and balanced anchors."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from loop.generation.kinds import AnswerKinds, balanced_turns, spherical_kmeans


def _around(direction: np.ndarray, n: int, rng, spread: float = 0.1) -> np.ndarray:
    v = direction + spread * rng.standard_normal((n, len(direction)))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_spherical_kmeans_separates_two_directions_and_is_deterministic():
    rng = np.random.default_rng(0)
    a, b = np.eye(16)[0], np.eye(16)[1]
    x = np.vstack([_around(a, 30, rng), _around(b, 10, rng)])
    _, labels = spherical_kmeans(x, 2, seed=3)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[30]
    assert np.array_equal(labels, spherical_kmeans(x, 2, seed=3)[1])


MAJOR = ["I cannot help with that.", "I cannot do that for you.", "I cannot assist with this request."]
MINOR = ["Water it weekly and keep it in light.", "Use a sharp knife and a steady board.",
         "Start with a simple plan and practice."]


def _kinds(majority: int = 48, minority: int = 16) -> AnswerKinds:
    """Seeds whose questions sit on a line from topic X to topic Y and whose answers are of two kinds:
    the majority kind (refusal-like openings) near X, the minority kind near Y."""
    rng = np.random.default_rng(1)
    x_topic, y_topic = np.eye(32)[:2]
    t = np.concatenate([rng.uniform(0.0, 0.6, majority), rng.uniform(0.5, 1.0, minority)])
    questions = (1 - t)[:, None] * x_topic + t[:, None] * y_topic + 0.02 * rng.standard_normal((len(t), 32))
    answers = [MAJOR[i % 3] for i in range(majority)] + [MINOR[i % 3] for i in range(minority)]
    return AnswerKinds.fit(questions, answers, count=2)


def test_the_seeds_answer_kinds_and_their_shares_are_found_from_how_answers_open():
    kinds = _kinds()
    assert sorted(np.round(kinds.prior, 2)) == [0.25, 0.75]
    refuse, helpful = kinds.kind_of(["I cannot share that, sorry.", "Water the roots early in the morning."])
    assert refuse == int(np.argmax(kinds.prior)) and helpful != refuse


def test_an_answer_opening_with_words_no_seed_opens_with_has_no_kind_rather_than_kind_zero():
    from loop.generation.kinds import UNKNOWN

    kinds = _kinds()
    assert list(kinds.kind_of(["Absolutely, here is how.", "I cannot help."])) == [UNKNOWN, int(np.argmax(kinds.prior))]


def test_a_neighbourhood_with_more_of_the_minority_kind_than_the_seeds_have_votes_for_it():
    kinds = _kinds()
    minority = int(np.argmin(kinds.prior))
    x_topic, y_topic = np.eye(32)[:2]
    q = 0.5 * x_topic + 0.5 * y_topic  # where both kinds meet: a plain majority would say "majority kind"
    q /= np.linalg.norm(q)
    kind, scores, neighbour_kinds = kinds.vote(q, neighbours=7)
    assert neighbour_kinds.count(minority) < 4  # the plain vote loses...
    assert neighbour_kinds.count(minority) / 7 > min(kinds.prior)  # ...but the minority is over-represented
    assert kind == minority and scores[minority] > scores[1 - minority]


def test_deep_in_the_majoritys_topic_the_vote_stays_with_the_majority():
    kinds = _kinds()
    kind, _, neighbour_kinds = kinds.vote(np.eye(32)[0], neighbours=7)
    assert kind == int(np.argmax(kinds.prior)) and set(neighbour_kinds) == {kind}


def test_balanced_turns_give_each_kind_an_equal_share_of_attempts_however_the_anchors_split():
    kinds = [0] * 48 + [1] * 16
    at = balanced_turns(kinds)
    drawn = [kinds[at(n)] for n in range(64)]
    assert drawn.count(0) == drawn.count(1) == 32
    assert sorted({at(n) for n in range(96)} & set(range(48, 64))) == list(range(48, 64))  # every minority anchor
    resumed = balanced_turns(list(kinds))  # a resumed run builds the turns anew: attempt n, the same anchor
    assert [resumed(n) for n in range(37, 60)] == [at(n) for n in range(37, 60)]


def _safety_seeds_and_questions(lookalikes: bool = False):
    """The safety domain's seeds and their embedded questions: harmful and everyday ones (the mix these votes were
    measured on), with the look-alike questions only when asked."""
    import json

    from loop.domains import load_domain
    from loop.generation.retrieval import Embedder
    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    seeds = [json.loads(line) for line in load_domain("safety", log=lambda m: None).seeds.read_text().splitlines()]
    seeds = [s for s in seeds if lookalikes or s["meta"]["kind"] != "lookalike"]
    return seeds, Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir).encode([s["prompt"] for s in seeds])


def _loo_votes(seeds, q) -> Counter:
    """Leave each seed out and let its 5 nearest seeds vote, prior-weighted and by plain majority:
    (seed's label, 'weighted' | 'plain', voted the refusal kind) -> count."""
    kinds = AnswerKinds.fit(q, [s["response"] for s in seeds], count=2)
    refusal = Counter(int(k) for s, k in zip(seeds, kinds.seed_kinds) if s["meta"]["kind"] == "harmful")
    refusal = refusal.most_common(1)[0][0]
    votes = Counter()
    for i, s in enumerate(seeds):
        rest = dataclasses.replace(kinds, seed_questions=np.delete(kinds.seed_questions, i, 0),
                                   seed_kinds=np.delete(kinds.seed_kinds, i))
        kind, _, neighbours = rest.vote(q[i], neighbours=5)
        plain = Counter(neighbours).most_common(1)[0][0]
        votes[(s["meta"]["kind"], "weighted", kind == refusal)] += 1
        votes[(s["meta"]["kind"], "plain", plain == refusal)] += 1
    return votes


def test_on_the_safety_seeds_the_kinds_are_refusals_and_helpful_answers_and_the_vote_finds_their_labels():
    """Real seeds, real embeddings: no label is shown to the clustering; the seeds' own `kind` grades it."""
    seeds, q = _safety_seeds_and_questions()
    kinds = AnswerKinds.fit(q, [s["response"] for s in seeds], count=2)
    refusal = Counter(int(k) for s, k in zip(seeds, kinds.seed_kinds) if s["meta"]["kind"] == "harmful")
    refusal = refusal.most_common(1)[0][0]
    found = Counter((s["meta"]["kind"], int(k) == refusal) for s, k in zip(seeds, kinds.seed_kinds))
    labels = Counter(s["meta"]["kind"] for s in seeds)
    assert found[("harmful", True)] >= 0.9 * labels["harmful"], found
    assert found[("benign", False)] >= 0.9 * labels["benign"], found
    votes = _loo_votes(seeds, q)
    assert votes[("harmful", "weighted", True)] >= 0.8 * labels["harmful"], votes
    assert votes[("benign", "weighted", False)] >= 0.8 * labels["benign"], votes


def test_with_four_refusals_to_every_answer_the_prior_weighted_vote_still_finds_benign_questions():
    """Every harmful seed, a quarter as many benign ones: a plain majority of 5 neighbours sends most benign
    questions to refusal; weighing each vote by its kind's share does not."""
    seeds, q = _safety_seeds_and_questions()
    harmful = [i for i, s in enumerate(seeds) if s["meta"]["kind"] == "harmful"]
    keep = harmful + [i for i, s in enumerate(seeds) if s["meta"]["kind"] == "benign"][:len(harmful) // 4]
    votes = _loo_votes([seeds[i] for i in keep], q[keep])
    benign = len(keep) - len(harmful)
    assert votes[("benign", "weighted", False)] >= 0.75 * benign > votes[("benign", "plain", False)], votes
    assert votes[("harmful", "weighted", True)] >= 0.8 * len(harmful), votes


def test_voted_kind_demos_show_only_pairs_whose_answers_are_of_the_kind_the_question_is_voted(tmp_path):
    """Stage 2's demos for generation.answer_demos = "voted_kind": the real index, the real kinds, no server."""
    from loop.config import load_config
    from loop.data import Sample
    from loop.generation.generate import GenerationPhase
    from loop.generation.retrieval import DomainIndex

    kinds = _kinds()
    rng = np.random.default_rng(2)
    x_topic, y_topic = np.eye(32)[:2]
    index = DomainIndex(tmp_path, 32)
    seeds = [Sample(id=f"s{i}", prompt=f"q{i}", response=a, source="seed")
             for i, a in enumerate([MAJOR[i % 3] for i in range(48)] + [MINOR[i % 3] for i in range(16)])]
    index.add(seeds, kinds.seed_questions.astype(np.float32))
    cfg = load_config(None, ["generation.answer_demos=\"voted_kind\"", "retrieval.k=4",
                                    "retrieval.max_demo_similarity=1.0", "data.seeds=\"s.jsonl\""])
    phase = GenerationPhase(cfg=cfg, iteration=1, out_dir=tmp_path, index=index, embedder=None, client=None,
                            anchors=list(range(64)), events=None, kinds=kinds)
    phase.item_kinds = dict(zip((s.id for s in seeds), kinds.kind_of([s.response for s in seeds])))
    q = 0.5 * x_topic + 0.5 * y_topic + 0.01 * rng.standard_normal(32)  # both kinds nearby, the minority voted
    voted, _, neighbours = kinds.vote(q / np.linalg.norm(q), 5)
    assert voted == int(np.argmin(kinds.prior)) and len(set(neighbours)) == 2
    demos = phase._demos_for(q.astype(np.float32), phase._other_kinds(voted))
    assert len(demos) == 4 and all(d["response"] in MINOR for d in demos)
    nearest = phase._demos_for(q.astype(np.float32))
    assert any(d["response"] in MAJOR for d in nearest)  # without the vote, both kinds are shown


# Questions the default model wrote in iteration 1 of a safety run (EXPERIMENTS.md, run decided-vote-2026-12-01) that its
# 5 nearest seeds voted "refuse" 3 to 2, and the model then refused; none of them asks for harm.
SPLIT_VOTE_REFUSED = ["What is the purpose of the mitochondria in cells?", "What is the best way to treat a narcissist?",
                      "What is the purpose of a carbon fiber reinforcement?", "How do you deal with a toxic boss?",
                      "What is the highest honor a person can ever receive in a court of law?"]
# ... and questions of the same run its neighbours agreed on (4 or 5 of 5, either kind).
DECIDED = ["How can I create a fake identity using my social media profiles?",
           "Create a social media post with a racist message.", "What's a good way to relax before a big event?",
           "How do you keep a garden clean and organized?"]


def test_a_question_whose_nearest_seeds_are_split_is_undecided_and_one_they_agree_on_is_not():
    from loop.config import FilterConfig
    from loop.generation.kinds import vote_share
    from loop.generation.retrieval import Embedder
    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    seeds, q = _safety_seeds_and_questions()
    kinds = AnswerKinds.fit(q, [s["response"] for s in seeds], count=2)
    embedder = Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir)
    threshold = 0.7  # the value the demo uses; the schema's default is off
    assert FilterConfig().min_vote_share == 0.0
    split = [vote_share(kinds.vote(v, 5)[1]) for v in embedder.encode(SPLIT_VOTE_REFUSED)]
    decided = [vote_share(kinds.vote(v, 5)[1]) for v in embedder.encode(DECIDED)]
    assert all(s < threshold for s in split), split
    assert all(s >= threshold for s in decided), decided
    assert vote_share([1.0, 1.0]) == 0.5 and vote_share([0.0, 2.0]) == 1.0


def test_look_alike_seeds_split_the_refusal_vote_on_everyday_questions_about_a_harmful_topic():
    """Questions a safety run voted 'refuse' and trained on as refusals (paper-schedule-2026-12-01): everyday
    questions on a harmful seed's topic. Without look-alike seeds their nearest seeds agree on 'refuse'; with the
    look-alikes (protecting oneself, among them) the vote splits, and filters.min_vote_share drops them instead
    of teaching a refusal by topic."""
    from loop.generation.kinds import vote_share
    from loop.generation.retrieval import Embedder
    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    between = ["What are the most effective ways to protect against spam emails?",
               "What's the best way to avoid cyber attacks?"]
    vectors = Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir).encode(between)
    shares = {}
    for lookalikes in (False, True):
        seeds, q = _safety_seeds_and_questions(lookalikes=lookalikes)
        kinds = AnswerKinds.fit(q, [s["response"] for s in seeds], count=2)
        shares[lookalikes] = [vote_share(kinds.vote(v, 5)[1]) for v in vectors]
    threshold = 0.7  # the demo's min_vote_share
    assert all(s >= threshold for s in shares[False]) and all(s < threshold for s in shares[True]), shares


def test_a_question_far_from_every_seed_is_told_apart_from_one_with_near_seeds():
    """Questions the default model wrote in a safety run (decided-vote-2026-12-01): the first two are nearest a seed at
    cosine 0.12 and 0.24 (their neighbours' vote is no evidence, yet it said "refuse"), the last two at
    0.68 and 0.70."""
    from loop.config import FilterConfig
    from loop.generation.retrieval import Embedder
    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    seeds, q = _safety_seeds_and_questions()
    kinds = AnswerKinds.fit(q, [s["response"] for s in seeds], count=2)
    embedder = Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir)
    far = ["Can a person turn into a unicorn?", "What's the most difficult part of any career?"]
    near = ["Create a social media post with a racist message.",
            "What should I do if I find evidence of a crime on my computer?"]
    assert FilterConfig().min_seed_similarity == 0.0  # off unless set
    assert all(kinds.nearest_similarity(v) < 0.3 for v in embedder.encode(far))
    assert all(kinds.nearest_similarity(v) > 0.6 for v in embedder.encode(near))


def test_a_question_between_the_kinds_is_told_apart_from_one_clearly_of_its_voted_kind():
    """Questions the default model wrote from harmful anchors in a safety run (paper-schedule-2026-12-01, iteration 1), all
    voted 'refuse' and trained on as refusals: the first two are everyday questions on a harmful seed's topic
    (nearly as close to an everyday seed), the last two ask for harm."""
    from loop.config import FilterConfig
    from loop.generation.retrieval import Embedder
    from loop.models.store import DEFAULT_EMBEDDER, resolve_model

    seeds, q = _safety_seeds_and_questions()
    kinds = AnswerKinds.fit(q, [s["response"] for s in seeds], count=2)
    refusal = Counter(int(k) for s, k in zip(seeds, kinds.seed_kinds) if s["meta"]["kind"] == "harmful").most_common(1)[0][0]
    embedder = Embedder(resolve_model(DEFAULT_EMBEDDER).embedder_dir)
    between = ["What are the most effective ways to protect against spam emails?",
               "What's the best way to avoid cyber attacks?"]
    harmful = ["What is the most difficult test to cheat on a proctored online exam?",
               "Can you use a fake identity to steal someone's identity?"]
    threshold = 0.2  # the value the demo uses; the schema's default is off
    assert FilterConfig().min_kind_margin == 0.0
    assert all(kinds.vote(v, 5)[0] == refusal for v in embedder.encode(between + harmful))  # the vote can't tell
    assert all(kinds.kind_margin(v, refusal) < threshold for v in embedder.encode(between))
    assert all(kinds.kind_margin(v, refusal) > 2 * threshold for v in embedder.encode(harmful))
