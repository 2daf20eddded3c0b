"""The options several commands share are defined once: `serve` and `worker` take their server flags from the
server's own settings (server/process.py ServerSettings), as `eval` takes its flags from the eval schema."""

from __future__ import annotations

import click
import pytest
from pydantic import ValidationError

from loop.cli import cli
from loop.cli.common import SERVER_FLAGS, SERVER_KEYS
from server.process import ServerSettings


def _options(command: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_flags_are_the_server_settings_fields(command):
    options = _options(command)
    for key in SERVER_KEYS:
        field, option = ServerSettings.model_fields[key], options[key]
        assert option.opts == [SERVER_FLAGS.get(key, f"--{key.replace('_', '-')}")]
        if key in ("host", "ctx_per_slot", "threads"):  # the commands' own defaults and help are for the others
            assert option.default == field.default and option.help == field.description, key
        bounds = [(m.ge if hasattr(m, "ge") else None, m.le if hasattr(m, "le") else None) for m in field.metadata]
        if bounds:
            low = next((lo for lo, _ in bounds if lo is not None), None)
            high = next((hi for _, hi in bounds if hi is not None), None)
            assert (option.type.min, option.type.max) == (low, high), key
    assert options["api_key"].envvar == "ISARA_API_KEY"


def test_serve_chooses_its_backend_among_the_settings_own_and_the_commands_keep_their_ports():
    assert list(_options("serve")["backend"].type.choices) == ["auto", "native", "python"]
    assert "backend" not in _options("worker")  # a router is llama-server only
    assert (_options("serve")["port"].default, _options("worker")["port"].default) == (8080, 8090)
    assert (_options("serve")["slots"].default, _options("worker")["slots"].default) == (4, 8)


def test_server_settings_refuse_an_unknown_backend_and_out_of_range_numbers_when_made():
    for bad in ({"backend": "cuda"}, {"slots": 0}, {"port": 70000}, {"ctx_per_slot": 8}, {"threads": 0}):
        with pytest.raises(ValidationError):
            ServerSettings(model=None, **bad)
    settings = ServerSettings(model="m.gguf", lora=["a.gguf"])
    assert settings.backend == "auto" and settings.lora[0].name == "a.gguf"
