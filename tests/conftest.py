"""Shared fixtures: the real default model, the real toolchain, a tiny Llama built here.

Nothing is mocked. `make test` runs `make setup` first, so the toolchain and the
default model are present; a missing one fails loudly with the fix.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def toolchain():
    from server.toolchain import find_toolchain, toolchain_dir

    tc = find_toolchain()
    if tc is None:
        pytest.fail(f"llama.cpp toolchain not built in {toolchain_dir()}: run `make setup`")
    return tc


@pytest.fixture(scope="session")
def default_model():
    from loop.models import DEFAULT_CHAT_MODEL, is_pulled, resolve_model

    if not is_pulled(DEFAULT_CHAT_MODEL):
        pytest.fail(f"{DEFAULT_CHAT_MODEL} is not pulled: run `make setup`")
    return resolve_model(DEFAULT_CHAT_MODEL)


def run_isara(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a person runs it: a separate process, its exit code and output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "loop.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input as the standards want it: exit 2, one line naming problem and fix, no traceback."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def unsupported_copy(hf_dir: Path, dest: Path) -> Path:
    """A copy of an HF folder that claims an architecture llama.cpp's converter does not know."""
    import json
    import shutil

    shutil.copytree(hf_dir, dest)
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


def _tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


def build_tiny_llama(out: Path, seed: int = 0, train_steps: int = 80) -> Path:
    """A 2-layer Llama with a SentencePiece tokenizer trained offline.

    The converter rejects byte-level BPE tokenizers trained with `tokenizers`
    (unknown pre-tokenizer hash), so the vocabulary is SentencePiece with
    byte fallback. A short training run on a cyclic text makes its next-token
    distribution peaked: greedy decoding then has clear margins, so an exact
    token comparison across HF and llama.cpp is meaningful and not a coin toss
    on near-ties of random weights.
    """
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = _tiny_corpus(seed=seed)
    (out / "corpus.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2, num_threads=1,
        # llama.cpp puts a space before the text after every special token when the model has a
        # dummy prefix; HF does not: without one both tokenize chat-formatted text alike.
        add_dummy_prefix=False)
    (out / "corpus.txt").unlink()
    (out / "tokenizer.vocab").unlink()
    tok = LlamaTokenizer.from_pretrained(out, add_prefix_space=False)
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    text = " ".join(corpus[:40])
    ids = torch.tensor([tok(text)["input_ids"][:128]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(train_steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "tokenizer.model.src").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "hf")


@pytest.fixture(scope="session")
def tiny_gguf_f16(tiny_llama, toolchain, tmp_path_factory) -> Path:
    from server.gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama, tmp_path_factory.mktemp("tiny-gguf") / "tiny-f16.gguf")
