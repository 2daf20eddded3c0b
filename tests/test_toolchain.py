"""Finding the llama.cpp toolchain: a half-built one never counts."""

from __future__ import annotations

import json

from server import toolchain


def _fake_tree(root):
    (root / "bin").mkdir(parents=True)
    (root / "convert").mkdir()
    for p in ("bin/llama-server", "bin/llama-quantize", "convert/convert_hf_to_gguf.py",
              "convert/convert_lora_to_gguf.py"):
        (root / p).write_text("")


def test_cache_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ISARA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert toolchain.cache_root() == tmp_path / "isara"
    assert toolchain.toolchain_dir("cpu-x86_64") == tmp_path / "isara" / "llama.cpp-0.3.36-cpu-x86_64"


def test_a_build_without_its_complete_marker_is_not_a_toolchain(monkeypatch, tmp_path):
    monkeypatch.setenv("ISARA_CACHE", str(tmp_path))
    root = toolchain.toolchain_dir("cpu-test")
    _fake_tree(root)
    assert toolchain.find_toolchain("cpu-test") is None
    (root / "COMPLETE").write_text(json.dumps({"variant": "cpu-test"}))
    found = toolchain.find_toolchain("cpu-test")
    assert found is not None and found.llama_server == root / "bin" / "llama-server"


def test_a_marker_with_a_missing_binary_is_not_a_toolchain(monkeypatch, tmp_path):
    monkeypatch.setenv("ISARA_CACHE", str(tmp_path))
    root = toolchain.toolchain_dir("cpu-test")
    _fake_tree(root)
    (root / "COMPLETE").write_text("{}")
    (root / "bin" / "llama-quantize").unlink()
    assert toolchain.find_toolchain("cpu-test") is None


def test_cuda_detection_needs_a_gpu_not_just_nvcc(monkeypatch):
    monkeypatch.delenv("ISARA_CUDA", raising=False)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    assert toolchain.cuda_available() is False
    monkeypatch.setenv("ISARA_CUDA", "1")
    assert toolchain.cuda_available() is True
    assert toolchain.backend_cmake_flags("cuda") == ["-DGGML_CUDA=ON"]
    assert "-DGGML_NATIVE=OFF" in toolchain.backend_cmake_flags("cpu-x86_64")


def test_the_real_toolchain_is_complete_and_runs(toolchain):
    import subprocess

    info = json.loads((toolchain.root / "COMPLETE").read_text())
    assert info["llama_cpp_python"] == "0.3.36"
    out = subprocess.run([str(toolchain.llama_server), "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    for folder in ("gguf-py", "conversion"):  # the converter imports its siblings
        assert (toolchain.convert_hf.parent / folder).is_dir(), folder
