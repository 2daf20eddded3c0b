"""Chat templates: the model's own, or one chosen for a model that has none (a base model, as the
paper aligned), and a system prompt put the same way everywhere.

The chosen template is one Jinja text that training (the tokenizer), llama-server (the GGUF's
metadata: evaluation, `isara serve`, `isara chat`), the exported GGUFs and Ollama (`loop.export.ollama`)
all render, so nothing formats a conversation differently from what the model was trained on.
Generation uses none: ISARA shows the model raw Q/A demonstrations. A system prompt is written into that
text, as SmolLM2's template writes its own default one: a conversation without a system message
gets it, one with a system message keeps its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.errors import BadInput

# Built-in templates for a model without one. `plain` needs no special tokens (any base model): a turn
# ends with the model's own end-of-sequence token, which llama-server stops at.
BUILTIN = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    "llama3": ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
               "message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("{% if messages and messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
              "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
              "{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else "
              "message['role']) + '\n' + (first if loop.first else '') + message['content'] | trim + "
              "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
              "{% endif %}"),
    "plain": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
              "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}{% else %}"
              "{{ 'Answer: ' + message['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"),
}


def chosen_template(choice: str | None, base_dir: Path | None = None) -> str | None:
    """`model.chat_template`: None (the model's own), a built-in name, or a Jinja file."""
    if choice is None or choice == "":
        return None
    if choice in BUILTIN:
        return BUILTIN[choice]
    path = Path(choice).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise BadInput(f"model.chat_template {choice!r} is neither a built-in template "
                       f"({', '.join(BUILTIN)}) nor a Jinja file: name one of them or give the file's path")
    return path.read_text(encoding="utf-8")


def _jinja_literal(text: str) -> str:
    """A Jinja string literal both engines read alike: llama.cpp's lexer knows only the escapes \\n \\t
    \\r \\\\ \\" (no \\u), so other characters are written as they are."""
    bad = sorted({repr(c) for c in text if ord(c) < 32 and c not in "\n\t\r"})
    if bad:
        raise BadInput(f"model.system_prompt holds control characters ({', '.join(bad)}): remove them")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + escaped.replace("\r", "\\r") + '"'


def with_system_prompt(template: str, prompt: str) -> str:
    """`template` with `prompt` as the system message of every conversation that has none."""
    literal = _jinja_literal(prompt)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)


def effective_template(own: str | None, choice: str | None, system_prompt: str | None,
                       base_dir: Path | None = None) -> str | None:
    """The template a run trains, serves and exports with."""
    template = chosen_template(choice, base_dir) or own
    if template is not None and system_prompt is not None:
        template = with_system_prompt(template, system_prompt)
    return template


def own_template(model) -> str | None:
    """The chat template a resolved model carries: its GGUF's, else its HF tokenizer's."""
    from server.gguf import read_gguf

    if model.gguf is not None:
        found = read_gguf(model.gguf).chat_template
        if found:
            return found
    if model.hf_dir is not None:
        jinja = model.hf_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        try:
            config = json.loads((model.hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        found = config.get("chat_template")
        return found if isinstance(found, str) else None
    return None
