"""Safe by default: loopback unless told otherwise, an API key off loopback that the
client sends, no proxy from the environment, model loading that never runs code.
(Run names that escape the runs folder and models that ship code are in the
bad-input corpus; the whole run without network is in test_crash_resume.)"""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import REPO
from server.client import Endpoint, InferenceClient, RequestRejected
from server.process import ManagedServer, ServerSettings

# Every module of the two packages, their subpackages (loop/bench/, and any added later) included.
SOURCES = sorted((REPO / "loop").rglob("*.py")) + sorted((REPO / "server").rglob("*.py"))


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(scope="module")
def keyed_server(default_model, toolchain):
    with ManagedServer(ServerSettings(model=default_model.gguf, slots=1, ctx_per_slot=512, api_key="s3cret")) as srv:
        yield srv


def _ask(url: str, key: str | None, **client_kw):
    async def go():
        async with InferenceClient([Endpoint(url, api_key=key)], retries=0, **client_kw) as c:
            return await c.complete("The garden", max_tokens=2, temperature=0.0)
    return asyncio.run(go())


def test_a_server_with_an_api_key_refuses_requests_without_it(keyed_server):
    with pytest.raises(RequestRejected, match="401"):
        _ask(keyed_server.base_url, None)
    with pytest.raises(RequestRejected, match="401"):
        _ask(keyed_server.base_url, "wrong")


def test_the_client_sends_the_api_key_and_is_answered(keyed_server):
    assert _ask(keyed_server.base_url, "s3cret").completion_tokens == 2


def test_the_client_ignores_proxies_from_the_environment(keyed_server, monkeypatch):
    # A proxy variable pointing nowhere: a client that honoured it would fail to connect.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, "http://10.255.255.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _ask(keyed_server.base_url, "s3cret").completion_tokens == 2


def test_managed_servers_listen_on_loopback_only(keyed_server):
    assert keyed_server.settings.host == "127.0.0.1"
    listening = {c.laddr.ip for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == keyed_server.port}
    assert listening == {"127.0.0.1"}


def test_serving_off_loopback_works_with_a_key(default_model):
    settings = ServerSettings(model=default_model.gguf, slots=1, ctx_per_slot=512, host="0.0.0.0", api_key="k")
    with ManagedServer(settings) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        assert _ask(url, "k").completion_tokens == 2
        with pytest.raises(RequestRejected, match="401"):
            _ask(url, None)


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_source_scans_reach_into_every_subpackage():
    packages = {p.parent for p in (REPO / "loop").rglob("__init__.py")} | {REPO / "server"}
    assert REPO / "loop" / "bench" in packages
    assert packages <= {p.parent for p in SOURCES}, sorted(map(_name, packages - {p.parent for p in SOURCES}))


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_model_loading_never_runs_code_shipped_with_a_model(path):
    for call, name in _calls(path):
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert keywords.get("trust_remote_code") != "True", f"{_name(path)}:{call.lineno} {name}"
        if name.startswith(("AutoModel", "AutoTokenizer")) and name.endswith("from_pretrained"):
            assert keywords.get("trust_remote_code") == "False", f"{_name(path)}:{call.lineno} {name}"
        assert name not in ("torch.load", "pickle.load", "pickle.loads", "joblib.load"), \
            f"{_name(path)}:{call.lineno} unpickles with {name}"


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_weights_are_loaded_from_safetensors_only(path):
    for call, name in _calls(path):
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name == "AutoModelForCausalLM.from_pretrained" and "gguf_file" not in keywords:
            assert keywords.get("use_safetensors") == "True", f"{_name(path)}:{call.lineno}"


def test_the_cli_sets_hub_offline_and_no_telemetry_unless_told_otherwise():
    code = ("import os, sys\nsys.argv = ['isara', '--version']\nfrom loop import cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ['HF_HUB_OFFLINE'], os.environ['HF_HUB_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["1", "1"], out.stderr
    env["HF_HUB_OFFLINE"] = "0"  # a person who wants a library to download says so
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["0", "1"], out.stderr
