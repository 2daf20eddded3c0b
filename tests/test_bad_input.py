"""The bad-input corpus: each case is what a person might give isara, and the exact
line it must answer with. Every one: exit code 2, that one line on stderr, no
traceback, and nothing already kept is lost. Run through the CLI as a separate
process, as a person runs it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_config, run_isara, tiny_seeds, unsupported_copy

GOOD = "".join(json.dumps({"prompt": f"How do I grow plant number {i}?", "response": f"Water plant {i} weekly."}) + "\n"
               for i in range(6))
ROW = '{"prompt": "Why do leaves turn yellow?", "response": "Too much water, usually."}\n'


# One data-only iteration; `extra` is raw TOML, for the cases that need a broken file.
ONE_ITERATION = {"iterations": 1, "train.enabled": False}


def _config(tmp: Path, extra: str = "", seeds: int | str | bytes | None = GOOD, name: str = "seeds.jsonl",
            settings: dict | None = None) -> Path:
    return run_config(tmp, {**ONE_ITERATION, **(settings or {})}, seeds=seeds, seeds_name=name, name="bad",
                      raw=extra)


def run_with_seeds(content: str | bytes, name: str = "seeds.jsonl"):
    return lambda tmp: ["run", str(_config(tmp, seeds=content, name=name))]


def run_with(extra: str = "", *args: str):
    return lambda tmp: ["run", str(_config(tmp, extra)), *args]


def _bad_gguf(tmp: Path) -> list[str]:
    (tmp / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    return ["run", str(_config(tmp)), "--set", f'model.base="{tmp / "broken.gguf"}"']


def _pickle_only_model(tmp: Path) -> list[str]:
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return ["run", str(_config(tmp)), "--set", f'model.base="{folder}"']


def _remote_code_model(tmp: Path, default_model) -> list[str]:
    folder = unsupported_copy(default_model.hf_dir, tmp / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    return ["run", str(_config(tmp)), "--set", f'model.base="{folder}"']


def _unconvertible_model(tmp: Path, default_model) -> list[str]:
    folder = unsupported_copy(default_model.hf_dir, tmp / "odd")
    cfg = _config(tmp).read_text().replace("[train]\nenabled = false\n", "")
    (tmp / "bad.toml").write_text(cfg)
    return ["run", str(tmp / "bad.toml"), "--set", f'model.base="{folder}"',
            "--set", 'generation.endpoints=["http://127.0.0.1:9"]']


def _runs_dir_under_a_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("")
    return ["run", str(_config(tmp)), "--set", f'runs_dir="{tmp / "afile" / "runs"}"']


def _corrupt_state(tmp: Path) -> list[str]:
    cfg = _config(tmp)
    run = tmp / "runs" / "bad"
    run.mkdir(parents=True)
    (run / "state.json").write_text('{"version": 1, "phases": {')
    return ["run", str(cfg)]


_HELD: list[socket.socket] = []  # listening sockets that keep a port taken until the module ends


def _port_in_use(tmp: Path) -> list[str]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    _HELD.append(holder)
    return ["serve", "smollm2-135m", "--port", str(holder.getsockname()[1])]


# (case id, how to set it up -> CLI args, the exact line; {tmp} is the case's folder, {last} the last argument)
CASES = [
    ("malformed json line", run_with_seeds(GOOD + "{not json\n"),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 is not valid JSON (Expecting property name enclosed in "
     "double quotes): fix or remove them"),
    ("missing answer field", run_with_seeds(GOOD + '{"prompt": "Why?"}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 has 'prompt' but no 'response': fix or remove them"),
    ("missing question field", run_with_seeds(GOOD + '{"response": "Because."}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 has 'response' but no 'prompt': fix or remove them"),
    ("wrong field type", run_with_seeds(GOOD + '{"prompt": 42, "response": "Forty-two."}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 'prompt' and 'response' must be strings: fix or remove them"),
    ("empty question", run_with_seeds(GOOD + '{"prompt": "  ", "response": "Something."}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 has an empty question: fix or remove them"),
    ("empty answer", run_with_seeds(GOOD + '{"prompt": "Why?", "response": ""}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 has an empty answer: fix or remove them"),
    ("record not an object", run_with_seeds(GOOD + '["Why?", "Because."]\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 is not an object: fix or remove them"),
    ("unknown fields", run_with_seeds(GOOD + '{"q": "Why?", "a": "Because."}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 has no known fields (found: a, q); use prompt/response, "
     "instruction/output, messages or conversations: fix or remove them"),
    ("chat record without an assistant turn", run_with_seeds(GOOD + '{"messages": [{"role": "user", "content": "Hi"}]}\n'),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 ends on a user turn with no answer: add the answer or "
     "remove the turn: fix or remove them"),
    ("conversation ending on a user turn", run_with_seeds(GOOD + json.dumps({"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "And?"}]})
        + "\n"),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 ends on a user turn with no answer: add the answer or "
     "remove the turn: fix or remove them"),
    ("many bad records are counted", run_with_seeds(GOOD + '{"prompt": "a"}\n' * 5),
     "5 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 has 'prompt' but no 'response'; seeds.jsonl:8 has "
     "'prompt' but no 'response'; seeds.jsonl:9 has 'prompt' but no 'response'; and 2 more: fix or remove them"),
    ("repeated record", run_with_seeds(GOOD + GOOD.splitlines(keepends=True)[0]),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 repeats seeds.jsonl:1 exactly: fix or remove them"),
    ("binary file", run_with_seeds(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8),
     "{tmp}/seeds.jsonl looks binary, not text: give a JSONL, JSON, CSV or Parquet file"),
    ("ten megabyte line", run_with_seeds(GOOD + json.dumps({"prompt": "Why?", "response": "x" * 10_000_000}) + "\n"),
     "1 bad record(s) in {tmp}/seeds.jsonl: seeds.jsonl:7 is too long (10000000 characters; limit "
     "data.max_chars=8000): fix or remove them"),
    ("not utf-8", run_with_seeds(GOOD.encode() + '{"prompt": "Où?", "response": "Là."}\n'.encode("latin-1")),
     "{tmp}/seeds.jsonl:7 is not UTF-8: re-save the file as UTF-8"),
    ("empty seeds file", run_with_seeds(""),
     '{tmp}/seeds.jsonl is empty: add Q/A records, one JSON object per line (e.g. {{"prompt": "...", '
     '"response": "..."}})'),
    ("too few seeds", run_with_seeds(ROW),
     "{tmp}/seeds.jsonl has 1 usable seed sample(s); at least 2 are needed: add more Q/A records"),
    ("seeds file missing", lambda tmp: ["run", str(_config(tmp, seeds=None))],
     "seed file {tmp}/seeds.jsonl does not exist: check data.seeds"),
    ("seeds path is a folder", lambda tmp: (tmp / "seeds.jsonl").mkdir() or ["run", str(_config(tmp, seeds=None))],
     "{tmp}/seeds.jsonl is not a file: give a JSONL, JSON, CSV or Parquet file"),
    ("invalid json file", run_with_seeds('[{"prompt": "a", "response": "b"},', name="seeds.json"),
     "{tmp}/seeds.json:1 is not valid JSON (Expecting value): fix it, or use JSONL with one object per line"),
    ("json nested 100,000 levels deep", run_with_seeds("[" * 100_000 + "]" * 100_000, name="seeds.json"),
     "{tmp}/seeds.json nests arrays or objects too deeply to be records: give a JSON array of objects (or JSONL, one "
     "object per line)"),
    ("csv without the columns", run_with_seeds("title,body\nx,y\nz,w\n", name="seeds.csv"),
     "2 bad record(s) in {tmp}/seeds.csv: seeds.csv:2 has no known fields (found: body, title); use prompt/response, "
     "instruction/output, messages or conversations; seeds.csv:3 has no known fields (found: body, title); use "
     "prompt/response, instruction/output, messages or conversations: fix or remove them"),
    ("unknown config key in the file", run_with("temprature = 0.5"),
     "unknown config key 'temprature': remove it or check its spelling (see README, configuration)"),
    ("unknown config key in --set", run_with("", "--set", "generation.temprature=0.5"),
     "unknown config key 'generation.temprature' (did you mean 'generation.temperature'?): remove it or check "
     "its spelling (see README, configuration)"),
    ("wrong type", run_with('name = "bad"\n', "--set", "iterations=many"),
     "config key 'iterations': Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("zero count", run_with("", "--set", "generation.samples=0"),
     "config key 'generation.samples': Input should be greater than 0 (got 0)"),
    ("negative count", run_with("", "--set", "generation.slots=-2"),
     "config key 'generation.slots': Input should be greater than or equal to 1 (got -2)"),
    ("negative eval size", run_with("", "--set", "eval.n=-1"),
     "config key 'eval.n': Input should be greater than or equal to 0 (got -1)"),
    ("questions from the base model without a served adapter", run_with("", "--set",
                                                                        'generation.question_model="base"'),
     'generation.question_model = "base" needs export.mode = "lora" (the base model is served beside the adapter): '
     'set export.mode = "lora", or question_model = "current"'),
    ("override without a value", run_with("", "--set", "iterations"),
     "--set 'iterations' has no '=': write --set key=value, e.g. --set iterations=1"),
    ("invalid toml", lambda tmp: (tmp / "bad.toml").write_text("iterations = = 2\n") and ["run", str(tmp / "bad.toml")],
     "config file {tmp}/bad.toml is not valid TOML (Invalid value (at line 1, column 14)): fix the syntax"),
    ("missing config file", lambda tmp: ["run", str(tmp / "nope.toml")],
     "config file {tmp}/nope.toml does not exist: give the path of a .toml file (e.g. examples/quick.toml)"),
    ("run name escaping the runs folder", run_with("", "--name", "../escape"),
     "config key 'name': Value error, use letters, digits, '.', '_' or '-' (no '/', no '..'), at most 64 characters "
     "(got '../escape')"),
    ("absolute run name", run_with("", "--name", "/etc/cron.d"),
     "config key 'name': Value error, use letters, digits, '.', '_' or '-' (no '/', no '..'), at most 64 characters "
     "(got '/etc/cron.d')"),
    ("runs folder under a file", _runs_dir_under_a_file,
     "can't write to {tmp}/afile/runs/bad (Not a directory): choose a writable runs_dir (--set runs_dir=PATH)"),
    ("unknown model", run_with("", "--set", 'model.base="no-such-model"'),
     "unknown model 'no-such-model': give a catalog name (all-minilm-l6-v2, gemma3-270m, smollm2-135m), a .gguf file or an HF "
     "folder"),
    ("corrupt gguf", _bad_gguf,
     "{tmp}/broken.gguf has GGUF version 0, which this llama.cpp can't read: re-export it"),
    ("pickle-only model folder", _pickle_only_model,
     "{tmp}/pickled is not a model folder (no config.json with .safetensors, and not one .gguf): give a .gguf file "
     "or a Hugging Face folder saved with safetensors"),
    ("model that needs its own code", "remote-code",
     "{tmp}/remote needs its own Python code (auto_map in config.json): isara never runs code shipped with a model; "
     "use a model whose architecture transformers knows"),
    ("architecture the converter can't handle", "unconvertible",
     "llama.cpp's converter does not support the architecture NoSuchModelForCausalLM of {tmp}/odd: choose a model "
     "whose architecture llama.cpp supports (e.g. Llama, Qwen2, Mistral)"),
    ("corrupt state.json", _corrupt_state,
     "{tmp}/runs/bad/state.json is not valid JSON: restore it, or delete the run folder to start over"),
    ("eval prompts that are not json", run_with("", "--set", 'eval.refuse_prompts="refuse.jsonl"', "--set",
                                                "eval.baselines=false"),
     "{tmp}/refuse.jsonl:2 is not valid JSON (Expecting value): fix the line"),
    ("port in use", _port_in_use,
     "port {last} on 127.0.0.1 is already in use: choose another with --port, or leave it out to take a free one"),
    ("serving off loopback without a key", lambda tmp: ["serve", "smollm2-135m", "--host", "0.0.0.0"],
     "refusing to serve on 0.0.0.0 without an API key: pass --api-key, or keep the default host 127.0.0.1"),
    ("a worker off loopback without a key", lambda tmp: ["worker", "--models-root", str(tmp), "--host", "0.0.0.0"],
     "refusing to serve on 0.0.0.0 without an API key: pass --api-key, or keep the default host 127.0.0.1"),
    ("a worker's models folder missing", lambda tmp: ["worker", "--models-root", str(tmp / "shared")],
     "models folder {tmp}/shared does not exist: create it, or point --models-root at the folder the run writes "
     "its models to"),
]


@pytest.mark.parametrize("case, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_one_line_message_and_exit_code_2(case, setup, expected, tmp_path, default_model):
    if setup == "remote-code":
        args = _remote_code_model(tmp_path, default_model)
    elif setup == "unconvertible":
        args = _unconvertible_model(tmp_path, default_model)
    else:
        if case == "eval prompts that are not json":
            (tmp_path / "refuse.jsonl").write_text('{"prompt": "How do I hotwire a car?"}\n{"prompt": \n')
        args = setup(tmp_path)
    out = run_isara(*args, env={"COLUMNS": "1000"})
    line = expected.format(tmp=tmp_path, last=args[-1])
    assert_one_line_error(out)
    assert out.stderr.strip() == f"isara: error: {line}"
    assert not (tmp_path / "escape").exists() and not Path("/etc/cron.d/runs").exists()
    assert not Path("/tmp/pwned").exists()


# --- while a run is under way ----------------------------------------------------

@pytest.mark.pipeline
def test_a_full_disk_mid_generation_stops_with_one_line_and_keeps_every_accepted_sample(tiny_chat, tmp_path):
    cfg = _config(tmp_path, seeds=tiny_seeds(8), settings={**tiny_chat.settings, "name": "full",
                                                            "generation.samples": 4, "generation.slots": 1})
    run = tmp_path / "runs" / "full"
    gen = run / "iter-01" / "generated.jsonl"
    # The third accepted sample finds the disk full (ENOSPC injected at the write layer).
    out = run_isara("run", str(cfg), env={**tiny_chat.env, "COLUMNS": "1000", "ISARA_FAULT_ENOSPC": "generated.jsonl:2"})
    assert_one_line_error(out)
    assert out.stderr.strip() == (f"isara: error: the disk is full writing {gen}: free some space; "
                                  f"resume with: isara run {run}")
    kept = [json.loads(x)["id"] for x in gen.read_text().splitlines()]
    assert len(kept) == 2
    status = run_isara("status", str(run), env={**tiny_chat.env, "COLUMNS": "200"})
    assert "stopped: disk full in iter-01/generate" in status.stdout  # said in the run's files, too

    resumed = run_isara("run", str(cfg), env=tiny_chat.env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ids = [json.loads(x)["id"] for x in gen.read_text().splitlines()]
    assert len(ids) == 4 and len(set(ids)) == 4 and ids[:2] == kept


@pytest.mark.pipeline
def test_a_file_changed_after_its_phase_finished_is_refused_on_resume(tiny_chat, tmp_path):
    cfg = _config(tmp_path, seeds=tiny_seeds(8), settings={**tiny_chat.settings, "name": "edited",
                                                            "generation.samples": 2, "generation.slots": 1})
    assert run_isara("run", str(cfg), env=tiny_chat.env).returncode == 0
    gen = tmp_path / "runs" / "edited" / "iter-01" / "generated.jsonl"
    before = gen.read_text()
    gen.write_text(before + ROW)
    out = run_isara("run", str(cfg), "--set", "iterations=2", env={**tiny_chat.env, "COLUMNS": "1000"})
    assert_one_line_error(out)
    assert out.stderr.strip() == (f"isara: error: {gen} changed after phase 'iter-01/generate' finished: restore it, "
                                  f"or delete {gen.parent} to redo that phase")
    assert gen.read_text() == before + ROW  # nothing touched


def test_a_second_run_of_a_folder_a_live_run_holds_is_refused_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    cfg = run_config(tmp_path, seeds=None)  # past the guard, the missing seeds file would be the error
    run = tmp_path / "runs" / "garden"
    run.mkdir(parents=True)
    # A live process with a run's command line holds the folder (a real run would take minutes to start).
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "loop.cli", "run"])
    try:
        state = {"version": 1, "status": "running", "phases": {}, "pid": holder.pid}
        (run / "state.json").write_text(json.dumps(state))
        out = run_isara("run", str(cfg), "--plain")
        assert_one_line_error(out, f"being run by process {holder.pid}", f"isara run {run}")
        assert json.loads((run / "state.json").read_text()) == state
        assert sorted(p.name for p in run.iterdir()) == ["state.json"]
    finally:
        holder.kill()
        holder.wait()
    out = run_isara("run", str(cfg), "--plain")  # the holder is gone: the run goes on, to its own error
    assert_one_line_error(out, "data.seeds")
