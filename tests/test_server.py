"""The managed llama-server and the client, on the real default model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from conftest import REPO, pid_alive
from server.client import InferenceClient
from server.errors import BadInput, ServerUnavailable
from server.process import ManagedServer, ServerSettings

GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def smol_server(default_model, toolchain):
    with ManagedServer(ServerSettings(model=default_model.gguf, slots=8, ctx_per_slot=1024)) as srv:
        yield srv


def complete(srv_or_client, prompt, **kw):
    async def go():
        async with InferenceClient.for_servers([srv_or_client]) as c:
            return await c.complete(prompt, **kw)
    return asyncio.run(go())


def test_server_binds_loopback_and_reports_its_slots(smol_server):
    assert smol_server.backend == "native"
    assert smol_server.base_url.startswith("http://127.0.0.1:")
    props = httpx.get(smol_server.base_url + "/props", timeout=5).json()
    assert props["total_slots"] == 8


def test_completion_stops_at_stop_sequence(smol_server):
    out = complete(smol_server, "1, 2, 3, 4, 5,", max_tokens=40, stop=["8"], **GREEDY)
    assert "6" in out.text and "8" not in out.text
    assert out.finish_reason == "stop"
    assert out.completion_tokens < 40


def test_completion_honours_max_tokens(smol_server):
    out = complete(smol_server, "Once upon a time", max_tokens=7, **GREEDY)
    assert out.completion_tokens == 7
    assert out.finish_reason == "length"
    assert out.prompt_tokens > 0 and out.predicted_ms is not None


def test_eight_concurrent_requests_all_succeed(smol_server):
    prompts = [f"Question: name a fruit number {i}.\nAnswer:" for i in range(8)]

    async def go():
        async with InferenceClient.for_servers([smol_server]) as c:
            return await asyncio.gather(*(c.complete(p, max_tokens=24, seed=i) for i, p in enumerate(prompts)))

    results = asyncio.run(go())
    assert len(results) == 8
    assert all(r.completion_tokens > 0 and r.text for r in results)
    assert all(r.attempts == 1 for r in results)


def test_a_prompt_sent_again_is_read_from_the_prompt_cache_and_counted_as_cached(smol_server):
    # Demos shared between prompts are only worth ordering if the server reuses them: the client reports it.
    prompt = "Question: What is a good name for a dog?\nAnswer: Rex.\n\nQuestion: Name a colour.\nAnswer:"
    first = complete(smol_server, prompt, max_tokens=4, **GREEDY)
    again = complete(smol_server, prompt + " Blue.\n\nQuestion: Name a fruit.\nAnswer:", max_tokens=4, **GREEDY)
    assert again.prompt_tokens > first.prompt_tokens  # every prompt token counts, cached or not
    assert first.prompt_tokens // 2 < again.cached_tokens < again.prompt_tokens


def test_same_seed_gives_same_sample(smol_server):
    a = complete(smol_server, "The weather today is", max_tokens=16, temperature=0.9, seed=42)
    b = complete(smol_server, "The weather today is", max_tokens=16, temperature=0.9, seed=42)
    assert a.text == b.text


def test_chat_completion_applies_the_models_chat_template(smol_server, default_model):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Name three colors."}]
    rendered = AutoTokenizer.from_pretrained(default_model.hf_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system")

    async def go():
        async with InferenceClient.for_servers([smol_server]) as c:
            chat = await c.chat(messages, max_tokens=24, **GREEDY)
            raw = await c.complete(rendered, max_tokens=24, stop=["<|im_end|>"], **GREEDY)
            return chat, raw

    chat, raw = asyncio.run(go())
    # An answer about colours, however worded: "1. Red" and "The most obvious color is red" are a near tie
    # for this model (0.04 nats), and the F16 and Q8_0 files take different sides of it.
    assert any(color in chat.text.lower() for color in ("red", "blue", "green"))
    assert chat.text.strip() == raw.text.strip()


def test_restart_on_another_gguf_changes_the_answers(default_model, tiny_gguf_f16):
    prompt = "red green blue"
    with ManagedServer(ServerSettings(model=default_model.gguf, slots=1)) as srv:
        before = complete(srv, prompt, max_tokens=12, **GREEDY)
        port = srv.port
        srv.restart(model=tiny_gguf_f16)
        assert srv.port == port and srv.settings.model == tiny_gguf_f16
        after = complete(srv, prompt, max_tokens=12, **GREEDY)
    assert before.text != after.text


def test_killed_server_raises_clear_error_and_restart_serves_again(default_model):
    with ManagedServer(ServerSettings(model=default_model.gguf, slots=1)) as srv:
        async def go():
            async with InferenceClient.for_servers([srv], retries=2, backoff=0.1) as c:
                task = asyncio.create_task(
                    c.complete("Write a very long story about the sea.", max_tokens=4000, ignore_eos=True))
                await asyncio.sleep(1.0)
                os.killpg(srv.pid, signal.SIGKILL)
                with pytest.raises(ServerUnavailable) as err:
                    await task
                return str(err.value)

        message = asyncio.run(go())
        assert srv.base_url in message and "tries" in message
        assert not srv.alive()
        srv.restart()
        assert complete(srv, "Hello", max_tokens=4, **GREEDY).completion_tokens == 4


def test_one_client_spreads_requests_over_two_servers(default_model):
    # a core each: two servers each spinning threads on both cores crawl (40 s in the suite against 1 s)
    settings = ServerSettings(model=default_model.gguf, slots=2, ctx_per_slot=512, threads=1)
    with ManagedServer(settings) as a, ManagedServer(settings) as b:
        async def go():
            async with InferenceClient.for_servers([a, b]) as c:
                return await asyncio.gather(*(c.complete(f"Count to {i}:", max_tokens=8) for i in range(8)))

        results = asyncio.run(go())
    assert {r.endpoint for r in results} == {a.base_url, b.base_url}


def test_stop_leaves_no_server_process(default_model):
    srv = ManagedServer(ServerSettings(model=default_model.gguf, slots=1)).start()
    pid = srv.pid
    assert pid_alive(pid)
    srv.stop()
    assert not pid_alive(pid)


def test_a_server_stopped_when_asked_leaves_no_log_behind_and_one_that_died_keeps_it(default_model, tmp_path):
    import tempfile
    from pathlib import Path

    srv = ManagedServer(ServerSettings(model=default_model.gguf, slots=1)).start()
    log = srv.log_path
    assert log.parent == Path(tempfile.gettempdir()) and log.is_file()
    srv.stop()
    assert not log.exists()  # it served and stopped when asked: nothing anyone will read
    srv.start()
    os.killpg(srv.pid, signal.SIGKILL)
    srv.proc.wait(10)
    srv.stop()
    assert srv.log_path.is_file()  # the log an error about the dead server names
    srv.log_path.unlink()
    own = ServerSettings(model=default_model.gguf, slots=1, log_path=tmp_path / "server.log")
    ManagedServer(own).start().stop()
    assert (tmp_path / "server.log").is_file()  # a log of its own is the caller's


def test_server_dies_with_its_python_parent_even_on_sigkill(default_model, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from server.process import ManagedServer, ServerSettings
        srv = ManagedServer(ServerSettings(model={str(default_model.gguf)!r}, slots=1)).start()
        print(srv.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    assert pid_alive(server_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(server_pid)


# Two raw prompts (the second repeats: a repetition penalty would end the run of ones), then chat questions.
FALLBACK_PROMPTS = ["1, 2, 3, 4,", "1, 1, 1, 1, 1, 1, 1, 1,", "Name three colors.", "What is 2 + 2?",
                    "List the days of the week.", "What color is the sky on a clear day?"]


def test_python_fallback_backend_serves_the_same_model(default_model, smol_server):
    """Greedy tokens equal the native server's up to the first fork, and a fork only where the native server
    itself was torn (the fallback's token within 0.3 nats of its choice: the export verification's near-tie
    rule). The two builds' kernels round differently: "Name three colors." opens with "The" at -2.113 and
    "1" at -2.138 on the native server, and the fallback takes "1"."""
    rendered = FALLBACK_PROMPTS[:2] + [httpx.post(smol_server.base_url + "/apply-template", json={"messages": [
        {"role": "user", "content": q}]}).json()["prompt"] for q in FALLBACK_PROMPTS[2:]]

    async def native(prompt):
        async with InferenceClient.for_servers([smol_server]) as c:
            r = await c.post("/completion", {"prompt": prompt, "n_predict": 16, "n_probs": 5, **GREEDY})
        return [(p["token"], {t["token"]: t["logprob"] for t in p["top_logprobs"]})
                for p in r["completion_probabilities"]]

    async def fallback(srv, prompt):
        async with InferenceClient.for_servers([srv]) as c:  # sends repeat_penalty 1.0 (its default is 1.1)
            r = await c.post("/v1/completions", {"prompt": prompt, "max_tokens": 16, "logprobs": 1, **GREEDY})
        return r["choices"][0]["logprobs"]["tokens"]

    with ManagedServer(ServerSettings(model=default_model.gguf, backend="python")) as srv:
        assert srv.backend == "python" and srv.slots == 1
        theirs = [asyncio.run(fallback(srv, p)) for p in rendered]
    ours = [asyncio.run(native(p)) for p in rendered]
    for i in (0, 1):  # no tie in counting, and no repetition penalty: the same tokens throughout
        assert theirs[i] == [tok for tok, _ in ours[i]], (FALLBACK_PROMPTS[i], theirs[i])
    for prompt, mine, got in zip(FALLBACK_PROMPTS, ours, theirs):
        fork = next((i for i, (a, (b, _)) in enumerate(zip(got, mine)) if a != b), None)
        if fork is not None:
            chosen, top = mine[fork]
            assert got[fork] in top and top[chosen] - top[got[fork]] <= 0.3, (prompt, fork, got[fork], top)


def test_a_runs_client_of_the_fallback_sends_its_request_defaults(default_model):
    # Generation and the run's evaluations go through the run's own client, not `for_servers`.
    from loop.config import RunConfig
    from loop.serving import Serving

    with ManagedServer(ServerSettings(model=default_model.gguf, backend="python")) as srv:
        serving = Serving(RunConfig(domain="safety"), layout=None, events=None)
        serving.server = srv
        assert [e.defaults for e in serving.client().endpoints] == [{"repeat_penalty": 1.0}]


def test_python_fallback_backend_serves_under_an_alias_and_answers_requests_that_name_it(default_model):
    with ManagedServer(ServerSettings(model=default_model.gguf, backend="python", alias="smol")) as srv:
        models = httpx.get(srv.base_url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["smol"]
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120,
                       json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "smol"

        async def unnamed():  # the run's own requests name no model: the fallback still answers as the alias
            async with InferenceClient.for_servers([srv]) as client:
                return await client.complete("The capital of France is", max_tokens=2)

        assert asyncio.run(unnamed()).model == "smol"  # (without the alias in the defaults: the GGUF's path)


def test_an_alias_that_is_not_one_name_is_refused(default_model):
    with pytest.raises(BadInput, match="one non-empty name without commas"):
        ManagedServer(ServerSettings(model=default_model.gguf, alias="a,b")).start()


def test_two_hundred_concurrent_requests_are_each_answered_once_and_matched(smol_server):
    """Load: 200 requests at once on 8 slots. Each request forces a different token (logit bias), so each
    answer proves which request it belongs to; none is dropped, duplicated or crossed."""
    import psutil

    n = 200
    wanted = [1000 + i for i in range(n)]
    server_proc = psutil.Process(smol_server.pid)
    rss_before = server_proc.memory_info().rss + psutil.Process().memory_info().rss

    async def go():
        async with InferenceClient.for_servers([smol_server]) as c, httpx.AsyncClient() as probe:
            seen = {"processing": [], "deferred": []}  # what the server itself reports, during the burst

            async def watch():
                while True:
                    text = (await probe.get(smol_server.base_url + "/metrics")).text
                    for key in seen:
                        seen[key] += [float(line.split()[-1]) for line in text.splitlines()
                                      if line.startswith(f"llamacpp:requests_{key}")]
                    await asyncio.sleep(0.02)

            async def one(i):
                r = await c.post("/completion", {"prompt": f"Request {i}:", "n_predict": 4, "temperature": 0,
                                                 "logit_bias": [[wanted[i], 100.0]], "return_tokens": True})
                return i, r["tokens"]
            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(one(i) for i in range(n)))
            watcher.cancel()
            return results, seen

    results, seen = asyncio.run(go())
    assert len(results) == n
    assert sorted(i for i, _ in results) == list(range(n))
    assert all(tokens == [wanted[i]] * 4 for i, tokens in results)
    # The server was kept busy on all its slots and never had to defer a request: the client sends no more
    # than the slots it has, and queues the rest itself.
    assert max(seen["processing"]) == smol_server.slots, seen["processing"]
    assert len(seen["deferred"]) > 10 and max(seen["deferred"]) == 0, seen["deferred"]
    rss_after = server_proc.memory_info().rss + psutil.Process().memory_info().rss
    assert rss_after - rss_before < 300 * 2**20


def test_a_request_that_sets_its_adapter_to_scale_0_is_answered_by_the_base_model_alone(tiny_llama, tiny_gguf_f16,
                                                                                       tmp_path):
    """generation.question_model = "base" rests on this: one server holds the base and the adapter, and a
    request's `lora: [{"id": 0, "scale": 0}]` switches the adapter off for that request only (an empty list,
    tried, keeps the server's scales)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from server.gguf import convert_lora_to_gguf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a fresh LoRA is zero (B = 0): give it weight, so it changes what the model says
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = convert_lora_to_gguf(tmp_path / "adapter", tiny_llama, tmp_path / "adapter.gguf")

    async def greedy(srv, **extra) -> list[str]:
        async with InferenceClient.for_servers([srv]) as c:
            return [(await c.complete(p, max_tokens=12, temperature=0.0, seed=0, **extra)).text
                    for p in ("one two three", "the garden is", "seven")]

    with ManagedServer(ServerSettings(model=tiny_gguf_f16, slots=2)) as base_only:
        base = asyncio.run(greedy(base_only))
    with ManagedServer(ServerSettings(model=tiny_gguf_f16, lora=[adapter], slots=2)) as both:
        switched_off = asyncio.run(greedy(both, lora=[{"id": 0, "scale": 0.0}]))
        with_adapter = asyncio.run(greedy(both))
    assert switched_off == base
    assert with_adapter != base


def test_a_request_cancelled_just_as_its_connection_failed_leaves_no_unretrieved_error():
    """A killed server fails the POSTs in flight (ReadError) while a run cancels its other requests: an error
    nobody reads would be printed by asyncio, with its traceback, under the run's one-line message."""
    import gc

    from server.client import Endpoint

    async def main() -> list[dict]:
        loop, unread, made = asyncio.get_running_loop(), [], []
        loop.set_exception_handler(lambda _, context: unread.append(context))
        loop.set_task_factory(lambda lp, coro, **kw: made.append(asyncio.Task(coro, loop=lp, **kw)) or made[-1])
        # A "server" that accepts the connection and closes it unanswered: the POST fails at once.
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with InferenceClient([Endpoint(url, slots=1)], retries=0) as client:
            request = asyncio.create_task(client._post(client.endpoints[0], "/v1/completions", {}, {}))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until the POST has failed, before the request has seen it
                posts = [t for t in made if "AsyncClient.post" in t.get_coro().__qualname__]
                if posts and posts[0].done():
                    break
                await asyncio.sleep(0)
            assert posts and posts[0].done() and not request.done()
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            del posts
            made.clear()
        server.close()
        gc.collect()  # a task whose error was never read reports it when collected
        await asyncio.sleep(0)
        return unread

    unread = asyncio.run(main())
    assert not [c for c in unread if "never retrieved" in c.get("message", "")], unread
