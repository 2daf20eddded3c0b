"""The command line as a person uses it: exit codes, one-line errors, --help."""

from __future__ import annotations

import socket

import pytest

from conftest import assert_one_line_error, run_isara


@pytest.mark.parametrize("args", [[], ["doctor"], ["models"], ["models", "list"], ["models", "pull"], ["serve"],
                                  ["bench"], ["run"], ["status"], ["eval"], ["chat"], ["export"]])
def test_every_command_has_help_with_an_example(args):
    out = run_isara(*args, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    if args and args != ["models"]:
        assert "Example:" in out.stdout


def test_doctor_reports_the_backends_and_the_toolchain(toolchain, default_model):
    out = run_isara("doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("llama-server", "llama-quantize", "serving backend", "training backend", "smollm2-135m"):
        assert word in out.stdout
    assert "missing" not in out.stdout


def test_doctor_names_the_fix_when_the_toolchain_is_missing(tmp_path):
    out = run_isara("doctor", env={"ISARA_TOOLCHAIN": str(tmp_path / "none"), "COLUMNS": "200"})
    assert out.returncode == 1
    assert "make setup" in out.stdout


def test_models_list_shows_the_pulled_default_model(default_model):
    out = run_isara("models", "list", env={"COLUMNS": "200"})
    assert out.returncode == 0
    line = next(ln for ln in out.stdout.splitlines() if "smollm2-135m" in ln)
    assert "yes" in line


def test_serving_a_corrupt_gguf_is_a_one_line_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00" * 4096)
    assert_one_line_error(run_isara("serve", str(bad), env={"COLUMNS": "300"}), "broken.gguf", "not a GGUF file")


def test_serving_a_missing_model_lists_the_known_runs_and_models(tmp_path):
    assert_one_line_error(run_isara("serve", str(tmp_path / "nope.gguf"), env={"COLUMNS": "300"}),
                           "neither a run nor a model", "smollm2-135m")


def test_serving_on_a_port_in_use_is_a_one_line_error(default_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_isara("serve", "smollm2-135m", "--port", str(port), env={"COLUMNS": "300"})
    assert_one_line_error(out, f"port {port}", "already in use", "--port")


def test_serving_off_loopback_without_an_api_key_is_refused(default_model):
    assert_one_line_error(run_isara("serve", "smollm2-135m", "--host", "0.0.0.0", env={"COLUMNS": "300"}),
                           "without an API key", "--api-key")


def test_a_missing_llama_server_binary_names_the_fix(default_model, tmp_path):
    out = run_isara("serve", "smollm2-135m", "--backend", "native",
                    env={"ISARA_TOOLCHAIN": str(tmp_path / "none"), "COLUMNS": "300"})
    assert_one_line_error(out, "llama-server is not built", "make setup")


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00" * 4096)
    out = run_isara("--debug", "serve", str(bad))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_bench_sets_the_served_weights_beside_the_types_it_is_not_served_at(default_model, toolchain, tmp_path):
    from loop.bench import _variant_models
    from server.gguf import read_gguf

    others = _variant_models(default_model.gguf, default_model.hf_dir, tmp_path, default_model.source_gguf)
    assert set(others) == {"F16", "Q4_1 (catalog GGUF)"}  # served at Q8_0: not measured twice
    assert read_gguf(others["F16"]).quant == "F16" and others["Q4_1 (catalog GGUF)"] == default_model.source_gguf


def test_bench_quick_measures_engines_bounds_isara_phases_and_retrieval(default_model, toolchain, tmp_path):
    import json

    out = run_isara("bench", "--quick", "--out", str(tmp_path), timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    engines = {(r["engine"], r["in_flight"]) for r in data["generation"]}
    assert {e for e, _ in engines} == {"llama-server (managed)", "llama_cpp.server", "transformers generate"}
    assert {n for e, n in engines if e == "llama-server (managed)"} == {1, 4, 8, 16}
    gen_k = data["isara_generation"]
    assert [r["k"] for r in gen_k] == [2, 4, 8] and all(r["accepted"] > 0 for r in gen_k)
    # more demos, longer prompts: the cost the k sweep exists to show
    assert gen_k[0]["stage2_prompt_tokens"] < gen_k[1]["stage2_prompt_tokens"] < gen_k[2]["stage2_prompt_tokens"]
    it = data["iteration"]
    assert set(it["phases_s"]) == {"generate", "train", "export", "eval"}
    assert it["train"]["tokens_per_s"] > 0 and it["train"]["peak_rss_mb"] > 0
    assert {"merge", "convert", "quantize", "verify"} <= set(it["export_merged_s"])
    assert "convert" in it["export_lora_s"] and it["server_start_s"] > 0
    assert all(r["gen_tok_s"] > 0 and 0 < r["share_of_bound"] for r in data["generation"])
    assert data["limits"]["memory_gb_s"] > 0 and data["bounds"]["decode_batched_tok_s"] > 0
    assert [r["items"] for r in data["retrieval"]] == [1000, 10000]
    assert all(0.0 <= r["recall_at_k"] <= 1.0 for r in data["retrieval"])
    assert data["machine"]["cores_logical"] >= 1
