"""Seeds in the formats people already use, and every bad record reported."""

from __future__ import annotations

import csv
import json

import pytest

from loop.data import DataError, load_samples, read_jsonl, append_jsonl
from server.errors import BadInput

PAIRS = [("How do I water tomatoes?", "Deeply, two or three times a week."),
         ("When do I plant garlic?", "In autumn, before the ground freezes."),
         ("Why are my leaves yellow?", "Too much water, or too little nitrogen.")]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


FORMATS = {
    "prompt_response.jsonl": lambda p: _write_jsonl(p, [{"prompt": q, "response": a} for q, a in PAIRS]),
    "alpaca.jsonl": lambda p: _write_jsonl(p, [{"instruction": q, "input": "", "output": a} for q, a in PAIRS]),
    "openai_messages.jsonl": lambda p: _write_jsonl(p, [{"messages": [{"role": "user", "content": q},
        {"role": "assistant", "content": a}]} for q, a in PAIRS]),
    "sharegpt.jsonl": lambda p: _write_jsonl(p, [{"conversations": [
        {"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS]),
    "array.json": lambda p: p.write_text(json.dumps([{"prompt": q, "response": a} for q, a in PAIRS])),
}


def _csv(p):
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        w.writerows(PAIRS)


def _parquet(p):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [q for q, _ in PAIRS], "response": [a for _, a in PAIRS]}), p)


FORMATS["table.csv"] = _csv
FORMATS["table.parquet"] = _parquet


@pytest.mark.parametrize("filename", sorted(FORMATS))
def test_every_input_format_loads_the_same_seeds(filename, tmp_path):
    path = tmp_path / filename
    FORMATS[filename](path)
    samples = load_samples(path)
    assert [(s.prompt, s.response) for s in samples] == PAIRS
    reference = load_samples(FORMATS["prompt_response.jsonl"](tmp_path / "ref.jsonl"))
    assert [s.id for s in samples] == [s.id for s in reference]


CONVERSATION = [{"from": "system", "value": "You are a gardener."},
                {"from": "human", "value": "How often should I water tomatoes?"},
                {"from": "gpt", "value": "Two or three times a week, deeply."},
                {"from": "human", "value": "And in a heat wave?"},
                {"from": "gpt", "value": "Every day, early in the morning."}]


def test_a_multi_turn_conversation_keeps_every_turn_and_its_system_message(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": CONVERSATION},
                                               {"prompt": PAIRS[0][0], "response": PAIRS[0][1]}])
    multi, single = load_samples(path)
    assert (multi.prompt, multi.response) == ("And in a heat wave?", "Every day, early in the morning.")
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert multi.messages() == [{"role": roles[t["from"]], "content": t["value"]} for t in CONVERSATION]
    assert single.context == [] and "context" not in single.to_json()


def test_the_same_last_exchange_in_another_conversation_is_another_sample(tmp_path):
    shorter = CONVERSATION[:1] + CONVERSATION[3:]
    path = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": CONVERSATION}, {"conversations": shorter}])
    first, second = load_samples(path)
    assert (first.prompt, first.response) == (second.prompt, second.response)
    assert first.id != second.id


def test_alpaca_input_field_joins_the_instruction(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Summarize:", "input": "Some text.", "output": "ok"},
                                               {"instruction": "Q2", "output": "A2"}])
    assert load_samples(path)[0].prompt == "Summarize:\n\nSome text."


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "q"}\n{"prompt": "q2", "response": "a2"}\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:1 has 'prompt' but no 'response'"),
    ('{"prompt": "q1", "response": "a1"}\nnot json\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:2 is not valid JSON"),
    ('{"prompt": "", "response": "a"}\n{"prompt": "q2", "response": "a2"}\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:1 has an empty question"),
    ('{"prompt": "q", "response": "  "}\n{"prompt": "q2", "response": "a2"}\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:1 has an empty answer"),
    ('{"text": "hello"}\n{"prompt": "q2", "response": "a2"}\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:1 has no known fields (found: text)"),
    ('{"prompt": "q", "response": "a"}\n{"prompt": "q", "response": "a"}\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:2 repeats s.jsonl:1 exactly"),
    ('{"prompt": 3, "response": "a"}\n{"prompt": "q2", "response": "a2"}\n{"prompt": "q3", "response": "a3"}\n',
     "'prompt' and 'response' must be strings"),
    ('[1, 2]\n{"prompt": "q2", "response": "a2"}\n{"prompt": "q3", "response": "a3"}\n',
     "s.jsonl:1 is not an object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "q2", "response": "a2"}\n',
     "s.jsonl:1 ends on a user turn with no answer"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": "and?"}]}\n{"prompt": "q2", "response": "a2"}\n',
     "s.jsonl:1 ends on a user turn with no answer"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "{}"}, '
     '{"role": "assistant", "content": "a"}]}\n{"prompt": "q2", "response": "a2"}\n',
     "s.jsonl:1 has a 'tool' turn (turn 2)"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"}, '
     '{"role": "assistant", "content": "a"}]}\n{"prompt": "q2", "response": "a2"}\n',
     "s.jsonl:1 has two user turns in a row (turn 2)"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "be brief"}, '
     '{"from": "gpt", "value": "a"}]}\n{"prompt": "q2", "response": "a2"}\n',
     "s.jsonl:1 has a system turn after the conversation began (turn 2)"),
    ('{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, '
     '{"role": "assistant", "content": "a"}]}\n{"prompt": "q2", "response": "a2"}\n',
     "s.jsonl:1 has a turn whose 'content' is not text (turn 1)"),
])
def test_each_bad_record_is_reported_with_file_and_line(content, message, tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_samples(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_all_bad_records_are_counted_not_just_the_first(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text("x\ny\nz\nw\n" + '{"prompt": "q", "response": "a"}\n')
    with pytest.raises(DataError) as err:
        load_samples(path)
    assert len(err.value.problems) == 4 and "4 bad record(s)" in str(err.value) and "and 1 more" in str(err.value)


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b'{"prompt": "caf\xe9", "response": "a"}\n'), "s.jsonl:1 is not UTF-8"),
    (lambda p: p.write_bytes(b"\x00\x01\x02binary" * 10), "looks binary"),
    (lambda p: p.write_text('{"prompt": "q", "response": "a"}\n'), "has 1 usable seed sample(s); at least 2"),
    (lambda p: p.write_text('{"prompt": "q", "response": "' + "x" * 9000 + '"}\n'), "is too long (9000 characters"),
])
def test_file_level_problems_have_a_clear_message(setup, message, tmp_path):
    path = tmp_path / "s.jsonl"
    setup(path)
    with pytest.raises(BadInput) as err:
        load_samples(path)
    assert message in str(err.value)


def test_a_missing_seeds_file_names_the_config_key(tmp_path):
    with pytest.raises(BadInput, match="data.seeds"):
        load_samples(tmp_path / "nope.jsonl")


def test_a_torn_last_line_is_dropped_and_the_file_repaired(tmp_path):
    path = tmp_path / "g.jsonl"
    append_jsonl(path, {"id": 1})
    append_jsonl(path, {"id": 2})
    with open(path, "ab") as f:
        f.write(b'{"id": 3, "pro')  # a crash in the middle of an append
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]
    append_jsonl(path, {"id": 3})
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_an_events_log_torn_by_a_kill_is_whole_lines_again_once_the_resumed_run_appends(tmp_path):
    from loop.events import Events

    path = tmp_path / "events.jsonl"
    Events(path, mode="quiet").emit("run_started", run="r")
    with open(path, "ab") as f:
        f.write(b'{"t": 1.0, "event": "train_step", "lo')  # SIGKILL in the middle of an append
    Events(path, mode="quiet").emit("run_resumed", run="r")
    lines = path.read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["run_started", "run_resumed"]
