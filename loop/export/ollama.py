"""An Ollama Modelfile that formats conversations exactly as the model was trained.

Ollama formats prompts with Go templates, not the Jinja chat template a GGUF
carries; left without a TEMPLATE it guesses a built-in one by resemblance, which
for SmolLM2 drops the default system prompt its own template (and so isara's
training) puts before every conversation. So the Go template is derived from the
GGUF's Jinja template by rendering it: what the template writes between one
message and the next depends, in the templates of the families isara trains
(ChatML, Llama 3, Gemma, Phi-3, Mistral), only on the two roles, so each such
gap is rendered once and written as a literal. A template that is not of that
shape (the derived gaps fail to rebuild a longer conversation) gets no TEMPLATE
and a comment saying so, rather than a wrong one.
"""

from __future__ import annotations

import json

from server.gguf import read_gguf

ROLES = ("system", "user", "assistant")
_END_OF_TURN_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")
_START, _GEN = "start", "generation"
# Message contents that no template changes (Gemma trims, others copy) and no template text contains.
_MARK = {"system": "ISARASYSTEMTEXT{}", "user": "ISARAUSERTEXT{}", "assistant": "ISARAASSISTANTTEXT{}"}


def _render(template: str, messages: list[dict], generation: bool, tokens: dict) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=generation,
                                        **tokens)
    return rendered[0]


def _conversation(roles: list[str]) -> list[dict]:
    return [{"role": r, "content": _MARK[r].format(i)} for i, r in enumerate(roles)]


def _gaps_of(template: str, roles: list[str], generation: bool, tokens: dict) -> dict[tuple[str, str], str]:
    """Render one conversation and cut it at its messages: the text between each pair of roles."""
    messages = _conversation(roles)
    text = _render(template, messages, generation, tokens)
    gaps, prev, pos = {}, _START, 0
    for m in messages:
        at = text.find(m["content"], pos)
        if at < 0:
            raise ValueError(f"the template does not write the {m['role']} message as given")
        gaps[(prev, m["role"])] = text[pos:at]
        prev, pos = m["role"], at + len(m["content"])
    gaps[(prev, _GEN if generation else "end")] = text[pos:]
    return gaps


def derive_gaps(template: str, tokens: dict) -> dict[tuple[str, str], str]:
    """Every gap between two roles (and from the start, and to the generation prompt), checked against
    a longer conversation rebuilt from them; ValueError if the template is not of that shape."""
    from jinja2.exceptions import TemplateError

    gaps: dict[tuple[str, str], str] = {}
    system = True
    for roles in (["user"], ["user", "assistant", "user"], ["system", "user"]):
        try:
            found = _gaps_of(template, roles, True, tokens)
        except TemplateError:
            if "system" not in roles:
                raise
            system = False  # the family has no system role (Gemma 2, Mistral): its template refuses one
            continue
        for pair, text in found.items():
            if gaps.setdefault(pair, text) != text:
                raise ValueError(f"the text between {pair[0]} and {pair[1]} depends on more than the two roles")
    check = ["system"] * system + ["user", "assistant", "user", "assistant", "user"]
    if _compose(gaps, _conversation(check)) != _render(template, _conversation(check), True, tokens):
        raise ValueError("a longer conversation renders differently from its parts")
    return gaps


def _compose(gaps: dict, messages: list[dict]) -> str:
    """What the Go template below renders, in Python: the derivation's own check."""
    out, prev = [], _START
    for m in messages:
        out += [gaps.get((prev, m["role"]), ""), m["content"]]
        prev = m["role"]
    if prev == "user":
        out.append(gaps.get(("user", _GEN), ""))
    return "".join(out)


def _go(text: str) -> str:
    """A Go string literal (JSON's escapes are Go's), so no template text is read as an action."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def go_template(gaps: dict[tuple[str, str], str]) -> str:
    """The Go template Ollama renders: per message, the gap from the previous role, then the content;
    after a last user message, the generation prompt."""
    lines = ['{{- $prev := "start" }}', "{{- range .Messages }}"]
    branch = "if"
    for (prev, role), text in gaps.items():
        if role in (_GEN, "end"):
            continue
        lines.append(f'{{{{- {branch} and (eq $prev "{prev}") (eq .Role "{role}") }}}}{_go(text)}')
        branch = "else if"
    lines += ["{{- end }}", "{{- .Content }}", "{{- $prev = .Role }}", "{{- end }}",
              f'{{{{- if eq $prev "user" }}}}{_go(gaps.get(("user", _GEN), ""))}{{{{ end }}}}']
    return "\n".join(lines)


def _token(meta: dict, key: str) -> str | None:
    tid = meta.get(f"tokenizer.ggml.{key}_token_id")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tid is None or not isinstance(tokens, list) or not 0 <= int(tid) < len(tokens):
        return None
    return tokens[int(tid)]


def template_tokens(meta: dict) -> dict:
    """The special tokens a chat template may name, as llama.cpp passes them."""
    return {"bos_token": _token(meta, "bos") or "", "eos_token": _token(meta, "eos") or ""}


def adds_bos(meta: dict) -> bool:
    """Whether llama.cpp (and Ollama) put a BOS before the prompt: the GGUF says, or, where it does not,
    a SentencePiece ("llama") vocabulary does and a BPE one does not, as llama.cpp decides."""
    flag = meta.get("tokenizer.ggml.add_bos_token")
    return bool(flag) if flag is not None else meta.get("tokenizer.ggml.model") == "llama"


def modelfile(gguf, gguf_name: str, adapter_name: str | None = None) -> str:
    """The Modelfile for `gguf`: FROM (and ADAPTER), the derived TEMPLATE, and a stop for each of the
    GGUF's end tokens (end of sequence, end of turn, end of message)."""
    return modelfile_for(read_gguf(gguf, keep_arrays=True).metadata, gguf_name, adapter_name)


def modelfile_for(meta: dict, gguf_name: str, adapter_name: str | None = None) -> str:
    """The Modelfile for a GGUF with metadata `meta` (its arrays kept)."""
    lines = ["# Made by isara export. Use: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    template = meta.get("tokenizer.chat_template")
    if template:
        tokens = template_tokens(meta)
        try:
            gaps = derive_gaps(template, tokens)
        except Exception as e:  # a template of another shape: Ollama's guess is better than a wrong one
            reason = " ".join(str(e).split())  # one comment line: Ollama reads a further line as a command
            lines.append(f"# No TEMPLATE: the GGUF's chat template could not be written for Ollama ({reason}); "
                         "check the prompt format Ollama picks")
        else:
            bos = tokens["bos_token"]
            if bos and adds_bos(meta):  # Ollama's tokenizer adds it already
                gaps = {pair: text.removeprefix(bos) if pair[0] == _START else text
                        for pair, text in gaps.items()}
            lines.append(f'TEMPLATE """{go_template(gaps)}"""')
    stops = []
    for key in ("eos", "eot", "eom"):
        token = _token(meta, key)
        if token and token not in stops:
            stops.append(token)
    # llama.cpp also ends a turn at these by name where the GGUF names no end-of-turn token (Gemma's
    # <end_of_turn>): a stop for each the template writes.
    vocab = meta.get("tokenizer.ggml.tokens")
    for token in _END_OF_TURN_NAMES:
        if token not in stops and template and token in template and isinstance(vocab, list) and token in vocab:
            stops.append(token)
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"
