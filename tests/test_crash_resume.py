"""Crash-safe resume: a training run SIGKILLed inside every phase, resumed each time.

One run (generate -> train -> export -> eval) of the tiny chat Llama built in
conftest (every real part, seconds instead of minutes: what is tested is the
run's bookkeeping, not its text) is killed with SIGKILL at five points:
generation with requests in flight, training mid-epoch (between two of its checkpoints), export mid-convert
and while quantizing, evaluation with requests in flight. After each kill no child of isara survives; the next `isara run`
picks up; the last one finishes. Every isara process runs with HF_HUB_OFFLINE=1,
in a network namespace without outbound network where the kernel allows one,
and with an audit hook that records (and refuses) any connection or name lookup
off loopback: the whole run must make none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, first_of, jsonl_rows, run_config, tiny_question, tiny_seeds

# Its module fixture runs six `isara run`s, killed and resumed; pytest-timeout charges fixture setup to the first test that uses it,
# so the budget here is the fixture's plus the test's (the project default is 900 s).
pytestmark = [pytest.mark.pipeline, pytest.mark.timeout(1800)]

# The tiny chat model writes a sample in a fraction of a second: enough of them that the generation kill
# lands with most still to come, and enough training steps (about 160 of a few ms) to strike mid-epoch.
SAMPLES = 12

CHECKPOINT_EVERY = 20  # of the 160 training steps

# Where to strike: (name, predicate over (events so far, isara's descendant processes)).
KILL_POINTS = [
    ("generation, requests in flight", lambda ev, kids: sum(e["event"] == "accepted" for e in ev) >= 2),
    # Past the first mid-epoch checkpoint (every CHECKPOINT_EVERY steps) and a few steps beyond it.
    ("training, mid-epoch", lambda ev, kids: any(e["event"] == "train_step" and e.get("checkpoint") for e in ev)
     and max(e["step"] for e in ev if e["event"] == "train_step") >= CHECKPOINT_EVERY + 3),
    ("export, mid-convert", lambda ev, kids: any("convert_hf_to_gguf" in " ".join(k) for k in kids)),
    # On the tiny model quantizing takes a tenth of a second: strike once it is seen, or once the F16
    # intermediate is verified (quantizing is next); either way the export is cut after its convert.
    ("export, quantizing", lambda ev, kids: any("llama-quantize" in " ".join(k) for k in kids)
     or any(e["event"] == "export_step" and e["step"] == "verify_f16" for e in ev)),
    ("evaluation, requests in flight", lambda ev, kids: any(e["event"] == "eval_started" for e in ev)
     and any("llama-server" in " ".join(k) for k in kids)),
]

NET_GUARD = textwrap.dedent('''
    # Loaded by every isara process of the test (PYTHONPATH): refuses and records any connection
    # or name lookup that is not loopback, and records that it loaded (and the network it saw).
    import json, os, socket, sys

    _LOG = os.environ["ISARA_TEST_NET_LOG"]
    _LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}

    with open(_LOG + ".loaded", "a") as f:
        f.write(json.dumps({"pid": os.getpid(),
                            "cmd": open("/proc/self/cmdline").read().split("\\0")[:4],
                            "interfaces": sorted(name for _, name in socket.if_nameindex())}) + "\\n")

    def _refuse(what):
        with open(_LOG, "a") as f:
            f.write(what + "\\n")
        raise OSError(101, "network blocked by the test: " + what)

    def _hook(event, args):
        if event == "socket.connect":
            sock, addr = args
            if sock.family in (socket.AF_INET, socket.AF_INET6) and addr[0] not in _LOCAL:
                _refuse(f"connect {addr!r}")
        elif event == "socket.getaddrinfo":
            host = args[0].decode() if isinstance(args[0], bytes) else args[0]
            if host not in _LOCAL:
                _refuse(f"getaddrinfo {host!r}")

    sys.addaudithook(_hook)
''')


def _netns_prefix() -> list[str]:
    """`unshare -rn` with loopback up, when this kernel lets an unprivileged user make a netns."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True)
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "isara"] if probe.returncode == 0 else []


def _write_config(tmp: Path, tiny_chat) -> Path:
    for name in ("refuse.jsonl", "answer.jsonl"):
        # Enough prompts and tokens that the tiny model's evaluation lasts long enough to be struck.
        (tmp / name).write_text("".join(json.dumps({"prompt": tiny_question()}) + "\n" for _ in range(24)))
    return run_config(tmp, {
        **tiny_chat.settings, "iterations": 1, "generation.samples": SAMPLES, "generation.slots": 2,
        "train.epochs": 8, "train.batch_size": 1, "train.grad_accum": 1, "train.checkpoint_every": CHECKPOINT_EVERY,
        "eval.refuse_prompts": "refuse.jsonl", "eval.answer_prompts": "answer.jsonl", "eval.max_tokens": 48,
        "eval.n": 0, "eval.baselines": False},
        seeds=tiny_seeds(8), name="crash")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdlines(procs: list[psutil.Process]) -> list[list[str]]:
    out = []
    for p in procs:
        try:
            out.append(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return out


def _run_until(cmd, env, run: Path, predicate) -> dict:
    """Start `isara run`; SIGKILL it when `predicate` holds. Returns what was seen at the kill."""
    events_path = run / "events.jsonl"
    seen_before = len(jsonl_rows(events_path))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            kids = _descendants(proc.pid)
            if predicate(jsonl_rows(events_path)[seen_before:], _cmdlines(kids)):
                kids = _descendants(proc.pid)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                gone, alive = psutil.wait_procs(kids, timeout=15)
                return {"killed": True, "children": len(kids), "orphans": [_cmdlines([p]) for p in alive]}
            time.sleep(0.02)
        proc.kill()
        return {"killed": False, "stderr": proc.stderr.read()[-3000:]}
    finally:
        # However this ends (an error in the predicate too), no run is left training on the cores that the
        # tests after this one are timed on.
        if proc.poll() is None:
            for p in [*_descendants(proc.pid), proc]:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    p.kill()
            proc.wait()


@pytest.fixture(scope="module")
def crashed_run(tiny_chat, toolchain, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    cfg = _write_config(tmp, tiny_chat)
    run = tmp / "runs" / "crash"
    guard = tmp / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NET_GUARD)
    net_log = tmp / "network.log"
    env = {**os.environ, **tiny_chat.env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": f"{guard}:{REPO}", "ISARA_TEST_NET_LOG": str(net_log)}
    cmd = [*_netns_prefix(), sys.executable, "-m", "loop.cli", "run", str(cfg), "--plain"]
    kills = {}
    for name, predicate in KILL_POINTS:
        kills[name] = _run_until(cmd, env, run, predicate)
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return {"run": run, "kills": kills, "final": final, "net_log": net_log, "netns": bool(_netns_prefix())}


@pytest.mark.parametrize("point", [name for name, _ in KILL_POINTS])
def test_sigkill_at_each_point_strikes_and_leaves_no_orphan_process(crashed_run, point):
    k = crashed_run["kills"][point]
    assert k["killed"], f"the run never reached {point}: {k.get('stderr')}"
    # A server or the converter was running; training runs in-process, and the quantizer may not have started.
    assert k["children"] >= 1 or point.startswith(("training", "export, quantizing"))
    assert k["orphans"] == [], f"left running after the kill at {point}: {k['orphans']}"


def test_the_run_killed_five_times_resumes_to_the_end(crashed_run):
    final = crashed_run["final"]
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    state = json.loads((crashed_run["run"] / "state.json").read_text())
    assert state["status"] == "finished"
    assert set(state["phases"]) >= {"seeds", "iter-01/generate", "iter-01/train", "iter-01/export", "iter-01/eval"}


def test_no_accepted_sample_is_lost_or_duplicated_across_the_kills(crashed_run):
    rows = jsonl_rows(crashed_run["run"] / "iter-01" / "generated.jsonl")
    ids = [r["id"] for r in rows]
    assert len(ids) == SAMPLES and len(set(ids)) == SAMPLES
    assert json.loads((crashed_run["run"] / "iter-01" / "stats.json").read_text())["accepted"] == SAMPLES


def test_every_file_a_phase_wrote_matches_its_recorded_checksum(crashed_run):
    from loop.state import RunState

    state = RunState(crashed_run["run"])
    for phase, record in state.data["phases"].items():
        assert record["files"], phase
        assert state.done(phase)  # raises if a file differs from what the phase recorded


def test_no_half_written_temp_file_is_left_in_the_run(crashed_run):
    leftovers = [p for p in crashed_run["run"].rglob("*") if ".tmp-" in p.name or ".write-test-" in p.name]
    assert leftovers == []


def test_training_killed_mid_epoch_goes_on_from_its_last_checkpoint(crashed_run):
    events = jsonl_rows(crashed_run["run"] / "events.jsonl")
    first, second = [i for i, e in enumerate(events) if e["event"] == "train_started"]
    before = [e for e in events[first:second] if e["event"] == "train_step"]
    after = [e for e in events[second:] if e["event"] == "train_step"]
    saved = max(e["checkpoint"] for e in before if e.get("checkpoint"))
    assert before[-1]["step"] > saved  # struck between two checkpoints
    assert before[-1]["step"] - saved < CHECKPOINT_EVERY  # what the kill cost
    assert after[0]["step"] == saved + 1 and after[-1]["step"] == after[-1]["steps"]
    finished = first_of((e for e in events[second:] if e["event"] == "train_finished"), "no train_finished event")
    assert finished["resumed_from_step"] == saved
    assert not (crashed_run["run"] / "iter-01" / "checkpoint").exists()  # gone once the adapter is saved


def test_each_killed_phase_was_restarted(crashed_run):
    events = jsonl_rows(crashed_run["run"] / "events.jsonl")
    count = {kind: sum(e["event"] == kind for e in events) for kind in
             ("generation_started", "train_started", "export_started", "eval_started")}
    # generation: killed once; training: once; export: twice (convert, quantize); evaluation: once
    assert count == {"generation_started": 2, "train_started": 2, "export_started": 3, "eval_started": 2}
    assert sum(e["event"] == "eval_finished" for e in events) == 1


def test_the_whole_run_made_no_network_connection(crashed_run):
    attempts = crashed_run["net_log"].read_text() if crashed_run["net_log"].exists() else ""
    assert attempts == "", f"connections off loopback were attempted:\n{attempts}"


def test_the_network_guard_was_in_every_isara_process(crashed_run):
    # The positive control of the test above: an empty log means something only if the guard was there.
    loaded = jsonl_rows(Path(f"{crashed_run['net_log']}.loaded"))
    runs = [r for r in loaded if "loop.cli" in r["cmd"]]
    assert len(runs) == len(KILL_POINTS) + 1, loaded
    assert any("convert_hf_to_gguf" in " ".join(r["cmd"]) for r in loaded)  # its Python children too


def test_inside_a_network_namespace_every_isara_process_saw_only_loopback(crashed_run):
    if not crashed_run["netns"]:
        pytest.skip("no unprivileged network namespace here (`unshare -rn` refused, or no `ip`): the run was "
                    "guarded by the audit hook alone")
    loaded = jsonl_rows(Path(f"{crashed_run['net_log']}.loaded"))
    assert loaded and {tuple(r["interfaces"]) for r in loaded} == {("lo",)}, loaded


def test_the_network_guard_refuses_and_records_a_name_lookup_off_loopback(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NET_GUARD)
    log = tmp_path / "network.log"
    out = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('pypi.org', 443)"],
                         env={**os.environ, "PYTHONPATH": str(tmp_path), "ISARA_TEST_NET_LOG": str(log)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "network blocked by the test" in out.stderr
    assert log.read_text() == "getaddrinfo 'pypi.org'\n"


def test_a_run_killed_in_its_baselines_resumes_them_and_a_rerun_reuses_them(tiny_chat, toolchain, tmp_path):
    # The baselines run once per run: a kill while the SFT-on-seeds baseline trains loses that phase only,
    # and running the finished run again computes none of them anew.
    (tmp_path / "ask.jsonl").write_text("".join(json.dumps({"prompt": tiny_question()}) + "\n" for _ in range(4)))
    cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 2,
                                "generation.slots": 2, "train.epochs": 8, "train.batch_size": 1,
                                "train.grad_accum": 1, "eval.refuse_prompts": "ask.jsonl",
                                "eval.answer_prompts": "ask.jsonl", "export.verify": "off"},
                     seeds=tiny_seeds(8), name="base")
    run = tmp_path / "runs" / "base"
    env = {**os.environ, **tiny_chat.env}
    cmd = [sys.executable, "-m", "loop.cli", "run", str(cfg), "--plain"]
    k = _run_until(cmd, env, run, lambda ev, kids: any(e["event"] == "train_step" and e["iteration"] == 0
                                                      and e["step"] >= 3 for e in ev))
    assert k["killed"] and k["orphans"] == [], k
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    events = jsonl_rows(run / "events.jsonl")
    started = [e["label"] for e in events if e["event"] == "eval_started"]
    assert started == ["base", "icl-knn", "sft-seeds", "iter-01"]  # the two before the kill were kept
    assert sum(e["event"] == "train_started" and e["iteration"] == 0 for e in events) == 2
    # export.verify = "off": exported, served and evaluated with no verification recorded
    assert json.loads((run / "iter-01" / "export.json").read_text())["verification"] is None
    before = {b: (run / "baselines" / b / "eval.json").read_bytes() for b in ("base", "icl-knn", "sft-seeds")}
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    skipped = [e["phase"] for e in jsonl_rows(run / "events.jsonl")[len(events):] if e["event"] == "phase_skipped"]
    assert {f"baselines/{b}/eval" for b in before} <= set(skipped)
    assert before == {b: (run / "baselines" / b / "eval.json").read_bytes() for b in before}


def test_a_run_killed_while_it_prepares_its_base_model_resumes_and_then_skips_the_preparation(tiny_chat, toolchain,
                                                                                              tmp_path):
    # Preparing the base model is the plan's first phase (base-model/prepare): here the tiny HF folder's GGUF is
    # made into a model store of the test's own (converted, verified), and the run is killed while it converts.
    cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 1, "generation.samples": 2,
                                "train.enabled": False, "eval.enabled": False}, seeds=tiny_seeds(8), name="prep")
    run, store = tmp_path / "runs" / "prep", tmp_path / "store"
    env = {**os.environ, "ISARA_MODELS": str(store)}
    cmd = [sys.executable, "-m", "loop.cli", "run", str(cfg), "--plain"]
    k = _run_until(cmd, env, run, lambda ev, kids: any("convert_hf_to_gguf" in " ".join(c) for c in kids))
    assert k["killed"] and k["orphans"] == [], k
    assert "base-model/prepare" not in json.loads((run / "state.json").read_text())["phases"]
    assert not (run / "base.json").exists()
    assert [e["event"] for e in jsonl_rows(run / "events.jsonl")].count("prepare_started") == 1
    final = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert list(state["phases"])[:3] == ["seeds", "base-model/prepare", "iter-01/generate"]
    base = json.loads((run / "base.json").read_text())
    assert base["name"] == tiny_chat.hf.name and Path(base["gguf"]).is_relative_to(store) and base["params"] is None
    assert state["phases"]["base-model/prepare"]["stats"]["gguf"] == base["gguf"]
    assert len(list((store / "local").glob("*/EXPORTED.json"))) == 1  # one whole export; the killed one counts not
    assert "base model " + tiny_chat.hf.name + ": serves " in final.stdout
    events = len(jsonl_rows(run / "events.jsonl"))
    again = subprocess.run([*cmd, "--set", "iterations=2"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    later = jsonl_rows(run / "events.jsonl")[events:]
    assert {"event": "phase_skipped", "phase": "base-model/prepare"}.items() <= first_of(
        (e for e in later if e["event"] == "phase_skipped"), "no phase_skipped event").items()
    assert not any(e["event"] == "prepare_started" for e in later)
    assert json.loads((run / "state.json").read_text())["phases"]["iter-02/generate"]["stats"]["accepted"] == 2

