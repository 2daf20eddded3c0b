"""Chat templates for models without one (base models), and a system prompt put alike everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, linked_copy, run_config, run_isara
from loop.models.local import serve_hf_folder, train_gguf_file, with_chat_template
from loop.models.store import resolve_model
from loop.models.templates import BUILTIN, chosen_template, effective_template, with_system_prompt
from server.errors import BadInput
from server.gguf import read_gguf

QUIET = dict(log=lambda *_: None)


def without_template(hf_dir: Path, dest: Path) -> Path:
    """A copy of an HF folder whose tokenizer carries no chat template, as a base model's doesn't."""
    linked_copy(hf_dir, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def render(template: str, messages: list[dict], **tokens) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **tokens)
    return rendered[0]


def test_a_run_on_a_model_without_a_chat_template_stops_naming_the_setting(tiny_llama, tmp_path):
    base = without_template(tiny_llama, tmp_path / "base-model")
    config = run_config(tmp_path, {"iterations": 1})
    out = run_isara("run", str(config), "--set", f'model.base="{base}"', env={"COLUMNS": "1000"})
    assert_one_line_error(out, f"{base} has no chat template", "set model.chat_template to a built-in (chatml, "
                                                              "llama3, gemma, plain) or a Jinja file")


@pytest.mark.slow
def test_a_chosen_template_goes_into_the_served_gguf_and_the_checkpoint_verified(tiny_llama, toolchain, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    base = without_template(tiny_llama, tmp_path / "base-model")
    model = serve_hf_folder(with_chat_template(resolve_model(base), BUILTIN["plain"], **QUIET), **QUIET)
    exported = json.loads((model.gguf.parent / "EXPORTED.json").read_text())
    assert exported["verification"]["passed"], exported  # llama-server renders and tokenizes it as training does
    assert read_gguf(model.gguf).chat_template == BUILTIN["plain"]
    assert (model.hf_dir / "chat_template.jinja").read_text() == BUILTIN["plain"]
    assert not (base / "chat_template.jinja").exists()  # the user's folder is left as it was
    again = with_chat_template(resolve_model(base), BUILTIN["plain"], **QUIET)
    assert again.hf_dir == model.hf_dir  # made once per model and template


@pytest.mark.slow
def test_a_gguf_without_a_template_trains_with_the_chosen_one(tiny_gguf_f16, toolchain, tmp_path, monkeypatch):
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    bare = tmp_path / "bare.gguf"
    script = toolchain.convert_hf.parent / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    subprocess.run([sys.executable, str(script), str(tiny_gguf_f16), str(bare), "--remove-metadata",
                    "tokenizer.chat_template", "--force"], check=True, capture_output=True)
    assert read_gguf(bare).chat_template is None
    with pytest.raises(BadInput, match="set model.chat_template"):
        train_gguf_file(resolve_model(bare), **QUIET)
    out = run_isara("models", "add", str(bare), "--chat-template", "chatml", env={"COLUMNS": "1000"})
    assert out.returncode == 0, out.stdout + out.stderr
    model = with_chat_template(resolve_model(bare), BUILTIN["chatml"], **QUIET)  # what the command made
    assert read_gguf(model.gguf).chat_template == BUILTIN["chatml"]
    derived = train_gguf_file(model, **QUIET)  # found, not made again
    record = json.loads((derived.hf_dir.parent / "DERIVED.json").read_text())
    assert record["verification"]["passed"], record
    assert f"trains on {derived.hf_dir}" in out.stdout


def test_a_system_prompt_replaces_the_models_default_and_yields_to_a_given_one(default_model):
    own = read_gguf(default_model.gguf).chat_template
    template = effective_template(own, None, "You answer in one sentence.")
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    text = render(template, question)
    assert "You answer in one sentence." in text and "named SmolLM" not in text
    assert render(own, question).count("named SmolLM") == 1  # the model's own default, untouched without it
    given = [{"role": "system", "content": "Be terse."}, *question]
    assert render(template, given) == render(own, given)


@pytest.mark.slow
def test_a_system_prompt_is_rendered_by_llama_server_as_in_training(tiny_llama, toolchain, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from loop.training.common import encode_example

    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    prompt = 'Réponds en couleurs — "rouge", s’il te plaît.\nPas de \\ ni de chiffres.'
    template = with_system_prompt(BUILTIN["chatml"], prompt)  # non-ASCII, quotes, a newline, a backslash
    model = serve_hf_folder(with_chat_template(resolve_model(tiny_llama), template, **QUIET), **QUIET)
    exported = json.loads((model.gguf.parent / "EXPORTED.json").read_text())
    assert exported["verification"]["passed"], exported  # the server's rendering equals the tokenizer's
    tok = AutoTokenizer.from_pretrained(model.hf_dir)
    example = encode_example(tok, "red apple?", "blue stone.", max_length=256)
    assert prompt in tok.decode(example["input_ids"])


@pytest.mark.pipeline
def test_model_system_prompt_in_a_whole_run_is_trained_on_exported_and_served_alike(tiny_chat, tmp_path):
    import hashlib

    import httpx
    from transformers import AutoTokenizer

    from conftest import tiny_seeds
    from loop.training.common import encode_example
    from server.process import ManagedServer, ServerSettings

    prompt = "seven nine north"  # in the tiny model's words
    cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 2, "train.epochs": 1,
                                "model.system_prompt": prompt}, seeds=tiny_seeds(8))
    out = run_isara("run", str(cfg), "--plain", env=tiny_chat.env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "garden"
    question = [{"role": "user", "content": "red north?"}]
    # Trained on: the adapter keeps the tokenizer the run trained with, and its examples open with the prompt.
    tok = AutoTokenizer.from_pretrained(run / "iter-01" / "adapter")
    assert prompt in tok.decode(encode_example(tok, "red north?", "blue stone.", max_length=128)["input_ids"])
    trained = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    # Exported: the iteration's GGUF carries the template the run began with; its server renders it alike.
    served = read_gguf(run / "iter-01" / "model.gguf").chat_template
    began = json.loads((run / "base.json").read_text())["chat_template_sha256"]
    assert hashlib.sha256(served.encode()).hexdigest() == began
    with ManagedServer(ServerSettings(model=run / "iter-01" / "model.gguf", slots=1)) as srv:
        rendered = httpx.post(f"{srv.base_url}/apply-template", json={"messages": question}, timeout=60,
                              trust_env=False).json()["prompt"]
    assert prompt in rendered and rendered == trained


def test_a_chat_template_is_a_builtin_name_or_a_jinja_file(tmp_path):
    assert chosen_template("chatml") == BUILTIN["chatml"] and chosen_template(None) is None
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    assert chosen_template(str(tmp_path / "mine.jinja")) == "{{ messages[0]['content'] }}"
    with pytest.raises(BadInput, match="neither a built-in template"):
        chosen_template("alpaca")


def test_a_relative_template_file_is_read_beside_the_config(tmp_path):
    from loop.config import load_config

    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    config = run_config(tmp_path, {"model.chat_template": "mine.jinja"})
    assert load_config(config).model.chat_template == str(tmp_path / "mine.jinja")


def test_a_resumed_run_whose_settings_give_another_template_is_refused(tiny_llama, tmp_path):
    """A run trains and serves with one template from its first iteration to its last."""
    (tmp_path / "mine.jinja").write_text(BUILTIN["chatml"])
    config = run_config(tmp_path, {"iterations": 1, "model.base": str(tiny_llama),
                                   "model.chat_template": "mine.jinja", "train.enabled": False})
    run = tmp_path / "runs" / "garden"
    run.mkdir(parents=True)
    (run / "base.json").write_text(json.dumps({"chat_template_sha256": "0" * 64}))  # as a first session left it
    (run / "state.json").write_text(json.dumps({"phases": {}}))
    out = run_isara("run", str(config), env={"COLUMNS": "1000"})
    assert_one_line_error(out, "run garden began with another chat template (sha256 000000000000, now",
                          "restore them, or start a new run")


def test_a_system_prompt_with_a_control_character_is_refused():
    with pytest.raises(BadInput, match="control characters"):
        with_system_prompt(BUILTIN["chatml"], "Be brief.\x00")
