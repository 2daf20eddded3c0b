"""`isara export RUN --format dataset --to DIR`: a run's data, in the forms other trainers load.

What is written (one folder, assembled in a temporary folder and renamed into place):

    messages.jsonl      {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}   (OpenAI chat, trl, axolotl)
    sharegpt.jsonl      {"conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "system": ...}
                                                                                                 (LLaMA-Factory)
    alpaca.jsonl        {"instruction": ..., "input": "", "output": ..., "system": ..., "history": [[q, a], ...]}
                                                                                                 (Alpaca, LLaMA-Factory)
    data.parquet        id, source, iteration, prompt, response, generated_by, context (the turns before prompt)
    dataset_info.json   LLaMA-Factory's entries for the two JSONL forms it reads
    README.md           the data set card: seeds' origin and licence, the model that wrote each iteration,
                        the configuration's hash, the filters' counts by reason

Every row carries `id`, `source` (seed | generated), `iteration` (0 for seeds) and `generated_by`.
A multi-turn seed leaves whole: every turn in `messages` and `conversations` (its system message in
`messages`, and as `system` beside `conversations`), its earlier exchanges as Alpaca's `history`.
Which rows: by default exactly what the run's model trained on (the iteration `isara export` takes:
the best on the held-out seeds, else the last exported; seeds plus the accepted samples of the
iterations its training used, per `train.samples`); `samples="all"` takes the seeds and every
accepted sample up to that iteration. A data-only run (training off) exports what it generated.
Held-out seeds (`data.validation`) are never included: the run kept them out of training, and a
data set that mixed them back would let a later model be scored on its own training data.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

from server.errors import BadInput
from server.tempfiles import temp_name

from loop.data import read_jsonl
from loop.evaluation.validation import run_model
from loop.files import atomic_dir, write_json_atomic, write_text_atomic
from loop.layout import GENERATE, RunLayout, phase_name
from loop.state import RunState

SAMPLES = ("trained", "all")
FILES = ("messages.jsonl", "sharegpt.jsonl", "alpaca.jsonl", "data.parquet", "dataset_info.json", "README.md")


def dataset_rows(run_dir: Path, iteration: int | None = None, samples: str = "trained") -> tuple[int, list[dict]]:
    """(the iteration the rows stop at, the rows): seeds first, then each iteration's accepted samples."""
    if samples not in SAMPLES:
        raise BadInput(f"unknown --samples {samples!r}: use one of {', '.join(SAMPLES)}")
    layout, state = RunLayout(run_dir), RunState(run_dir)
    generated = [t for t in state.iterations() if state.done(phase_name(t, GENERATE))]
    if not generated or not any(read_jsonl(layout.generated(t)) for t in generated):
        raise BadInput(f"run {layout.name} has no accepted samples yet: let `isara run {run_dir}` finish a "
                       "generation phase first")
    if iteration is None:
        iteration = run_model(state.validation_scores(), state.exported_iterations() or generated)
    if iteration not in generated:
        raise BadInput(f"run {layout.name} has no finished generation for iteration {iteration}: choose one of "
                       f"{', '.join(map(str, generated))}")
    cfg = _config(layout)
    latest_only = samples == "trained" and cfg.get("train", {}).get("samples", "all") == "latest"
    first = iteration if latest_only else 1
    rows = [_row(r, "seed", 0, None) for r in read_jsonl(layout.seeds)]
    for t in range(first, iteration + 1):
        model = _generator(layout, t)
        rows += [_row(r, "generated", t, model if model != "unknown" else _answered_as(r))
                 for r in read_jsonl(layout.generated(t))]
    return iteration, rows


def export_dataset(run_dir: Path, to: Path, iteration: int | None = None, samples: str = "trained") -> list[Path]:
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise BadInput(f"{to} exists and is not an empty folder: choose a new --to folder")
    last, rows = dataset_rows(run_dir, iteration, samples)
    to.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(to) as tmp:
        _write_jsonl(tmp / "messages.jsonl", ({"messages": _messages(r), **_provenance(r)} for r in rows))
        _write_jsonl(tmp / "sharegpt.jsonl", (
            {"conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in _messages(r)
                               if m["role"] != "system"], "system": _system(r), **_provenance(r)} for r in rows))
        _write_jsonl(tmp / "alpaca.jsonl", (
            {"instruction": r["prompt"], "input": "", "output": r["response"], "system": _system(r),
             "history": _history(r), **_provenance(r)} for r in rows))
        _write_parquet(tmp / "data.parquet", rows)
        write_json_atomic(tmp / "dataset_info.json", llama_factory_info(RunLayout(run_dir).name))
        write_text_atomic(tmp / "README.md", dataset_card(run_dir, last, samples, rows))
    return [to / name for name in FILES]


def llama_factory_info(name: str) -> dict:
    """LLaMA-Factory's `dataset_info.json`: put DIR as its `dataset_dir` and train on `NAME_sharegpt`."""
    return {f"{name}_sharegpt": {"file_name": "sharegpt.jsonl", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "system": "system"},
                                 "tags": {"role_tag": "from", "content_tag": "value",
                                          "user_tag": "human", "assistant_tag": "gpt"}},
            f"{name}_alpaca": {"file_name": "alpaca.jsonl", "formatting": "alpaca",
                               "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                           "system": "system", "history": "history"}}}


def dataset_card(run_dir: Path, last: int, samples: str, rows: list[dict]) -> str:
    layout = RunLayout(run_dir)
    cfg = _config(layout)
    seeds = sum(r["source"] == "seed" for r in rows)
    by_it: dict[int, int] = {}
    for r in rows:
        if r["source"] == "generated":
            by_it[r["iteration"]] = by_it.get(r["iteration"], 0) + 1
    held = len(read_jsonl(layout.validation)) if layout.validation.is_file() else 0
    trained = RunState(run_dir).exported_iterations()
    if samples == "all":
        which = f"the seeds and every accepted sample of iterations 1-{last}"
    elif last in trained:
        which = f"exactly what the model of iteration {last} trained on"
    else:
        which = f"what iteration {last} trains on; the run did not train it"
    lines = [f"# {layout.name}: seeds and self-generated samples (isara)", "",
             f"{len(rows)} question/answer pairs: {seeds} seeds and {len(rows) - seeds} samples the model wrote "
             f"itself from them ({which}). Written by `isara export {layout.name} --format dataset`"
             f"{' --samples all' if samples == 'all' else ''}.",
             "", "## Files", "",
             "| file | form | load it with |", "|---|---|---|",
             "| messages.jsonl | OpenAI chat `messages` | `datasets.load_dataset(\"json\", data_files=...)`, trl, "
             "axolotl (`type: chat_template`) |",
             "| sharegpt.jsonl | ShareGPT `conversations` | LLaMA-Factory (`dataset_info.json`) |",
             "| alpaca.jsonl | Alpaca `instruction`/`input`/`output` | LLaMA-Factory (`dataset_info.json`), axolotl "
             "(`type: alpaca`) |",
             "| data.parquet | columns id, source, iteration, prompt, response, generated_by, context | pandas, "
             "pyarrow, `datasets` |", "",
             "Every row has `id`, `source` (seed or generated), `iteration` (0 for seeds) and `generated_by` (the "
             "model that wrote it).", "", "## Seeds", ""]
    lines += _seed_origin(layout, cfg)
    multi = sum(bool(r["context"]) for r in rows if r["source"] == "seed")
    if multi:
        lines += ["", f"{multi} seeds are conversations of more than one exchange or with a system message: they "
                      "are here whole (every turn was trained on)."]
    if held:
        lines += ["", f"{held} more seeds were held out to choose the run's model (`data.validation`): they are not "
                      "in this data set, as they were not trained on."]
    scored = len(read_jsonl(layout.holdout)) if layout.holdout.is_file() else 0
    if scored:
        lines += ["", f"{scored} more seeds were held out to score every model of the run (`eval.holdout`): they "
                      "are not in this data set, so a model trained on it can still be scored on them."]
    lines += ["", "## How each iteration's samples were made", "",
              "| iteration | written by | accepted here | accepted / attempts | rejected, by reason |",
              "|---|---|---|---|---|"]
    for t in sorted(by_it):
        st = json.loads(layout.stats(t).read_text(encoding="utf-8")) if layout.stats(t).is_file() else {}
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((st.get("rejected_by_reason") or {}).items(),
                                                           key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {t} | {_generator(layout, t)} | {by_it[t]} | {st.get('accepted', '?')} / "
                     f"{st.get('attempts', '?')} | {reasons} |")
    config = layout.config.read_bytes() if layout.config.is_file() else b""
    lines += ["", "No instruction text, principles, reward model or judge model wrote or chose these samples: the "
                  "model saw related pairs as in-context examples (ISARA, arXiv 2401.06785) and isara's filters kept "
                  "what passed (the reasons above). They are a model's own writing: read them before you train on "
                  "them.", "",
              f"Configuration: `config.toml` of the run, sha256 `{hashlib.sha256(config).hexdigest()}`; base model "
              f"`{cfg.get('model', {}).get('base', 'smollm2-135m')}`.", ""]
    return "\n".join(lines)


# --- helpers -------------------------------------------------------------------

def _config(layout: RunLayout) -> dict:
    return tomllib.loads(layout.config.read_text(encoding="utf-8")) if layout.config.is_file() else {}


def _row(r: dict, source: str, iteration: int, generated_by: str | None) -> dict:
    return {"id": r["id"], "source": source, "iteration": iteration, "prompt": r["prompt"],
            "response": r["response"], "generated_by": generated_by, "context": r.get("context", [])}


SHAREGPT = {"user": "human", "assistant": "gpt"}


def _messages(r: dict) -> list[dict]:
    return [*r["context"], {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]


def _system(r: dict) -> str:
    return next((m["content"] for m in r["context"] if m["role"] == "system"), "")


def _history(r: dict) -> list[list[str]]:
    """The exchanges before the last, as LLaMA-Factory's Alpaca `history` holds them: [[question, answer], ...]."""
    turns = [m["content"] for m in r["context"] if m["role"] != "system"]
    return [turns[i:i + 2] for i in range(0, len(turns), 2)]


def _provenance(r: dict) -> dict:
    return {k: r[k] for k in ("id", "source", "iteration", "generated_by")}


def _answered_as(r: dict) -> str:
    """The name the server that wrote a sample's answer answered with (outside endpoints hold models the run
    does not know by file)."""
    return ((r.get("generated_by") or {}).get("answer") or {}).get("model") or "unknown"


def _generator(layout: RunLayout, t: int) -> str:
    """The model that wrote iteration t's samples: a model of the run (`iter-01/model.gguf`), or the base
    model by the name the configuration gives it; on outside endpoints, the names their servers answered
    with."""
    st = json.loads(layout.stats(t).read_text(encoding="utf-8")) if layout.stats(t).is_file() else {}
    model = st.get("model")
    if not model:
        answered = [m for m, c in (st.get("samples_by_model") or {}).items() if c.get("accepted") and m != "unrecorded"]
        return ", ".join(answered) or "unknown"
    path = layout.resolve(model)
    if path.is_relative_to(layout.root):
        return layout.relative(path)
    return str(_config(layout).get("model", {}).get("base", "smollm2-135m")) if Path(model).is_absolute() else model


def _seed_origin(layout: RunLayout, cfg: dict) -> list[str]:
    seeds_file = cfg.get("data", {}).get("seeds")
    if seeds_file:
        return [f"From the user's file `{seeds_file}`. Their licence is the file owner's: isara does not know it."]
    if not layout.domain.is_file():
        return ["Origin not recorded in the run."]
    dom = json.loads(layout.domain.read_text(encoding="utf-8"))
    files = ", ".join(f"`{f}`" for f in dom.get("files", {}).get("seeds.jsonl", []))
    out = [f"The built-in `{dom.get('domain')}` domain (version {dom.get('version')}), assembled from data files "
           f"inside PyPI wheels ({files}):", "", "| package | version | licence | wheel sha256 |", "|---|---|---|---|"]
    out += [f"| {p['package']} | {p['version']} | {p['license']} | `{p['wheel_sha256'][:16]}…` |"
            for p in dom.get("packages", [])]
    return out


def _write_jsonl(path: Path, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("iteration", pa.int32()), ("prompt", pa.string()),
        ("response", pa.string()), ("generated_by", pa.string()),
        ("context", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))]))
    tmp = temp_name(path)
    pq.write_table(table, tmp)
    tmp.replace(path)
