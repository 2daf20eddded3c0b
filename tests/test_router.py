"""llama-server's router mode (`isara worker`'s engine), on the real default model: models by name from a
folder, loaded and unloaded on request, each request answered by the model it names."""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from conftest import pid_alive
from server.client import InferenceClient, RequestRejected
from server.errors import BadInput, ServerUnavailable
from server.process import ManagedServer, ServerSettings
from server.router import Router


def offer(models_dir, name, gguf):
    """Put a model in a router's folder the way a run does: NAME/model.gguf (a link, not a copy)."""
    (models_dir / name).mkdir(parents=True)
    os.link(gguf, models_dir / name / "model.gguf")


@pytest.fixture
def router(default_model, toolchain, tmp_path):
    models = tmp_path / "models"
    offer(models, "first", default_model.gguf)
    with ManagedServer(ServerSettings(model=None, models_dir=models, slots=2, ctx_per_slot=512, threads=1)) as srv:
        yield srv, models


def complete(url, model, prompt="Question: Name a fruit.\nAnswer:"):
    async def go():
        async with InferenceClient([url], backoff=0.05) as c:
            return await c.complete(prompt, max_tokens=6, temperature=0.0, model=model)
    return asyncio.run(go())


def test_a_router_offers_every_model_of_its_folder_and_one_added_later(router, default_model):
    srv, models = router
    with Router(srv.base_url) as r:
        offered = r.models()
        assert set(offered) == {"first"} and offered["first"]["value"] == "unloaded"
        offer(models, "garden--iter-01", default_model.gguf)
        assert set(r.models()) == {"first", "garden--iter-01"}


def test_a_loaded_model_answers_the_requests_that_name_it_with_its_name(router):
    srv, _ = router
    with Router(srv.base_url) as r:
        r.load("first")
        r.wait_loaded("first", timeout=120)
        assert r.models()["first"]["value"] == "loaded"
    out = complete(srv.base_url, "first")
    assert out.model == "first" and out.completion_tokens > 0


def test_a_request_for_a_model_that_is_not_loaded_is_retried_then_refused_never_answered_by_another(router):
    srv, _ = router
    with pytest.raises(ServerUnavailable, match="not loaded"):
        complete(srv.base_url, "first")


def test_an_answer_from_another_model_than_the_one_a_request_names_is_refused(default_model, toolchain):
    # A plain llama-server answers as its alias whatever the request names: the client must notice.
    with ManagedServer(ServerSettings(model=default_model.gguf, slots=1, ctx_per_slot=512, alias="smollm")) as srv:
        with pytest.raises(RequestRejected, match="for model 'garden--iter-01' as 'smollm'"):
            complete(srv.base_url, "garden--iter-01")


def test_an_unloaded_model_stops_serving_and_its_server_exits(router):
    srv, _ = router
    with Router(srv.base_url) as r:
        r.load("first")
        r.wait_loaded("first", timeout=120)
        children = psutil.Process(srv.pid).children()
        assert len(children) == 1  # the model runs in a child llama-server
        r.unload("first")
        psutil.wait_procs(children, timeout=30)
        assert r.models()["first"]["value"] == "unloaded" and not pid_alive(children[0].pid)
    with pytest.raises(ServerUnavailable, match="not loaded"):
        complete(srv.base_url, "first")


def test_a_broken_model_file_fails_its_load_in_one_line_naming_the_router_and_the_model(router):
    srv, models = router
    (models / "broken").mkdir()
    (models / "broken" / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with Router(srv.base_url) as r:
        r.load("broken")
        with pytest.raises(BadInput) as err:
            r.wait_loaded("broken", timeout=60)
    assert srv.base_url in str(err.value) and "'broken'" in str(err.value) and "\n" not in str(err.value)


def test_a_model_missing_from_the_folder_is_refused_naming_the_router_and_the_fix(router):
    srv, _ = router
    with Router(srv.base_url) as r, pytest.raises(BadInput, match="no model 'garden--iter-02'.*--models-root"):
        r.load("garden--iter-02")


def test_stopping_a_router_stops_the_servers_of_its_loaded_models(default_model, toolchain, tmp_path):
    models = tmp_path / "models"
    offer(models, "first", default_model.gguf)
    srv = ManagedServer(ServerSettings(model=None, models_dir=models, slots=1, ctx_per_slot=512, threads=1)).start()
    try:
        with Router(srv.base_url) as r:
            r.load("first")
            r.wait_loaded("first", timeout=120)
        children = psutil.Process(srv.pid).children()
        assert children
    finally:
        srv.stop()
    psutil.wait_procs(children, timeout=30)
    assert not any(pid_alive(c.pid) for c in children)


def test_a_router_with_an_api_key_refuses_load_calls_without_it(default_model, toolchain, tmp_path):
    models = tmp_path / "models"
    offer(models, "first", default_model.gguf)
    with ManagedServer(ServerSettings(model=None, models_dir=models, slots=1, ctx_per_slot=512, threads=1,
                                      api_key="s3cret")) as srv:
        with Router(srv.base_url) as r, pytest.raises(BadInput, match="refused the API key"):
            r.models()
        with Router(srv.base_url, api_key="s3cret") as r:
            assert set(r.models()) == {"first"}


def test_a_router_takes_a_folder_that_exists_and_no_model_of_its_own(default_model, tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        ManagedServer(ServerSettings(model=None, models_dir=tmp_path / "nope")).start()
    with pytest.raises(BadInput, match="no adapters or alias"):
        ManagedServer(ServerSettings(model=None, models_dir=tmp_path, alias="x")).start()
    with pytest.raises(ValueError):
        ManagedServer(ServerSettings(model=default_model.gguf, models_dir=tmp_path)).start()
