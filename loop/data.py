"""Reading Q/A samples in the conventions people already use, and writing them.

Accepted per record (JSONL, JSON array, CSV or Parquet):
- `prompt` / `response` (also `question` / `answer`),
- Alpaca: `instruction` (+ `input`) / `output`,
- OpenAI chat: `messages`, ShareGPT: `conversations` with `from` human/gpt (or
  `role`/`content`): the whole conversation is kept. Its last user turn and the
  answer after it are the sample's question and answer; a system message and the
  earlier turns are its `context`, trained on with the rest (loss on every
  assistant turn). Retrieval embeds its user turns; demos show the last exchange.
  A conversation must alternate user and assistant turns (after an optional
  first system message) and end on an assistant turn.

Every unusable record is reported with file:line and the reason; nothing is
dropped silently. A file with problems fails as a whole (exit 2) listing them,
so the user fixes the data rather than training on a quietly shrunken set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.errors import BadInput
from server.tempfiles import temp_name

from loop.files import injected_fault

MIN_SEEDS = 2


@dataclass
class Sample:
    id: str
    prompt: str
    response: str
    source: str = "seed"  # seed | generated | pool
    meta: dict = field(default_factory=dict)
    # A multi-turn record's conversation before `prompt`: a system message and earlier user/assistant turns.
    context: list[dict] = field(default_factory=list)

    def retrieval_text(self) -> str:
        """What retrieval embeds: the question, after a conversation's earlier user turns (its topic: a last
        question like "And in a heat wave?" says little alone)."""
        return "\n".join([m["content"] for m in self.context if m["role"] == "user"] + [self.prompt])

    def messages(self) -> list[dict]:
        """The whole conversation, as chat templates render it."""
        return [*self.context, {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.response}]

    def to_json(self) -> dict:
        row = asdict(self)
        if not self.context:  # single-turn rows stay as they always were
            row.pop("context")
        return row


class DataError(BadInput):
    """Bad records: the message lists the first ones, `problems` holds all of them."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def sample_id(source: str, question: str, answer: str, context: list[dict] | None = None) -> str:
    """Stable across runs and machines: the same pair (in the same conversation) always gets the same id."""
    text = f"{question}\x1f{answer}"
    if context:  # only then: single-turn ids are what they always were
        text = json.dumps(context, ensure_ascii=False, sort_keys=True) + "\x1e" + text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    return f"{source[0]}-{digest}"


def _text(v) -> str | None:
    return v.strip() if isinstance(v, str) else None


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}


def _conversation(turns, role_key: str, text_key: str):
    """(context, question, answer, problem) of a chat record: the turns before the last user turn, that turn,
    the assistant's answer to it. Anything that can't be trained as it stands is a problem, never cut."""
    if not isinstance(turns, list):
        return [], None, None, "is not a list of turns"
    messages = []
    for n, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            return [], None, None, f"has a turn that is not an object (turn {n})"
        role, text = ROLES.get(t.get(role_key)), t.get(text_key)
        if role is None:
            return [], None, None, (f"has a {t.get(role_key)!r} turn (turn {n}): only system, user and "
                                      "assistant turns can be trained; remove it")
        if not isinstance(text, str):
            return [], None, None, f"has a turn whose {text_key!r} is not text (turn {n})"
        if role == "system" and messages:
            return [], None, None, f"has a system turn after the conversation began (turn {n}): put it first"
        expected = "user" if not messages or messages[-1]["role"] in ("system", "assistant") else "assistant"
        if role != "system" and role != expected:
            return [], None, None, (f"has two {role} turns in a row (turn {n}): user and assistant turns "
                                      "must alternate")
        if not text.strip():
            return [], None, None, f"has an empty {role} turn (turn {n})"
        messages.append({"role": role, "content": text.strip()})
    if not any(m["role"] == "user" for m in messages):
        return [], None, None, "has no user turn"
    if messages[-1]["role"] != "assistant":
        return [], None, None, "ends on a user turn with no answer: add the answer or remove the turn"
    return messages[:-2], messages[-2]["content"], messages[-1]["content"], None


def record_to_sample(rec) -> tuple[list[dict], str | None, str | None, str | None]:
    """(context, question, answer, problem): problem is None when the record is usable."""
    if not isinstance(rec, dict):
        return [], None, None, "is not an object"
    if "messages" in rec:
        return _conversation(rec["messages"], "role", "content")
    if "conversations" in rec:
        turns = rec["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
            return _conversation(turns, "from", "value")
        return _conversation(turns, "role", "content")
    q, a, problem = _pair_fields(rec)
    return [], q, a, problem


def _pair_fields(rec: dict) -> tuple[str | None, str | None, str | None]:
    for qk, ak in (("prompt", "response"), ("question", "answer"), ("instruction", "output")):
        if qk in rec or ak in rec:
            q, a = rec.get(qk), rec.get(ak)
            if qk not in rec:
                return None, None, f"has {ak!r} but no {qk!r}"
            if ak not in rec:
                return None, None, f"has {qk!r} but no {ak!r}"
            if not isinstance(q, str) or not isinstance(a, str):
                return None, None, f"{qk!r} and {ak!r} must be strings"
            q = q.strip()
            extra = rec.get("input") if qk == "instruction" else None
            if isinstance(extra, str) and extra.strip():
                q = f"{q}\n\n{extra.strip()}"
            return q, a.strip(), None
    keys = ", ".join(sorted(rec)[:6]) or "none"
    return None, None, (f"has no known fields (found: {keys}); use prompt/response, instruction/output, "
                        "messages or conversations")


def read_user_text(path: Path, expected: str, label: str = "") -> str:
    """A user's text file, whole and as given: one-line errors for binary or non-UTF-8 content.
    `expected` says what to give instead; `label` names the file's role ("eval set ")."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise BadInput(f"{label}{path} looks binary, not text: {expected}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BadInput(f"{label}{path}:{line} is not UTF-8: re-save the file as UTF-8") from None


def _records(path: Path):
    """Yield (line_or_row_number, record or parse-problem string)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise BadInput(f"{path} is not a readable Parquet file ({e}): check the file") from None
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield i, rec
        return
    text = read_user_text(path, "give a JSONL, JSON, CSV or Parquet file")
    if suffix == ".csv":
        for i, rec in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            yield i, rec
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{e.lineno} is not valid JSON ({e.msg}): fix it, "
                           "or use JSONL with one object per line") from None
        except RecursionError:  # the parser recurses once per level: [[[[...]]]] 100,000 deep exhausts it
            raise BadInput(f"{path} nests arrays or objects too deeply to be records: give a JSON array of "
                           "objects (or JSONL, one object per line)") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise BadInput(f"{path} holds no list of records: give a JSON array of objects")
        for i, rec in enumerate(data, start=1):
            yield i, rec
    else:  # .jsonl and anything else: one JSON object per line
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, f"is not valid JSON ({e.msg})"
            except RecursionError:
                yield i, "nests arrays or objects too deeply to be a record"


def load_samples(path: str | Path, *, source: str = "seed", max_chars: int = 8000,
                 min_count: int = MIN_SEEDS) -> list[Sample]:
    """Read and validate a sample file; raise DataError listing every bad record."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{source} file {path} does not exist: check data.{'seeds' if source == 'seed' else 'pool'}")
    if not path.is_file():
        raise BadInput(f"{path} is not a file: give a JSONL, JSON, CSV or Parquet file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path} is empty: add Q/A records, one JSON object per line "
                       '(e.g. {"prompt": "...", "response": "..."})')
    samples, problems, seen = [], [], {}
    for where, rec in _records(path):
        loc = f"{path.name}:{where}"
        if isinstance(rec, str):
            problems.append(f"{loc} {rec}")
            continue
        context, q, a, problem = record_to_sample(rec)
        longest = max([len(q or ""), len(a or "")] + [len(m["content"]) for m in context])
        if problem:
            problems.append(f"{loc} {problem}")
        elif not q:
            problems.append(f"{loc} has an empty question")
        elif not a:
            problems.append(f"{loc} has an empty answer")
        elif longest > max_chars:
            problems.append(f"{loc} is too long ({longest} characters; limit data.max_chars={max_chars})")
        elif (key := sample_id(source, q, a, context)) in seen:
            problems.append(f"{loc} repeats {path.name}:{seen[key]} exactly")
        else:
            seen[key] = where
            # A record's own `meta` (e.g. the built-in domain's kind: harmful / benign / lookalike) travels with
            # it; `file` and `line` say where this run read it.
            own = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
            samples.append(Sample(id=key, prompt=q, response=a, source=source,
                                  meta={**own, "file": path.name, "line": where}, context=context))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(f"{len(problems)} bad record(s) in {path}: {shown}: fix or remove them", problems)
    if len(samples) < min_count:
        raise BadInput(f"{path} has {len(samples)} usable {source} sample(s); at least {min_count} are needed: "
                       "add more Q/A records")
    return samples


# --- writing -------------------------------------------------------------------

def write_jsonl_atomic(path: Path, rows) -> None:
    injected_fault(path)
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    """One whole line in one write (O_APPEND), fsynced: a crash leaves at most a torn last line,
    which `read_jsonl` drops (repairing the file) on the next read."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    injected_fault(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def cut_torn_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) off an append-only log before appending to it again:
    left in place, the next whole line would be glued to it and the log would stop being JSONL."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def read_jsonl(path: Path, repair: bool = True) -> list[dict]:
    """All whole lines; a torn last line (a crash mid-append) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, good_end = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_end += len(line)
    if repair and good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows
