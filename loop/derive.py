"""A GGUF file made into the HF checkpoint LoRA training needs.

transformers reads the GGUF and dequantizes it; what it gets wrong is repaired
here, so that training (HF tokenizer), conversion back to GGUF (llama.cpp's
converter reads the folder) and serving (llama.cpp) tokenize alike. Whether
the result answers like the GGUF is checked after, against llama-server
(`loop.export.verify_derived`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from server.errors import BadInput
from server.gguf import read_gguf

from loop.files import atomic_dir, write_bytes_atomic, write_json_atomic, write_text_atomic

# transformers' own renames of llama.cpp architecture names (modeling_gguf_pytorch_utils.load_gguf_checkpoint).
_GGUF_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                      "minimax-m2": "minimax_m2"}
# Keys of its table that are no causal language model: metadata sections, encoder-decoders.
_NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5"}


def check_derivable(path: Path, info) -> None:
    """Refuse, before any work, a GGUF transformers can't turn into a checkpoint to train."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL_LM)
    arch = info.architecture
    if _GGUF_ARCH_RENAMES.get(arch, arch) not in supported:
        raise BadInput(f"{path} is a {arch} model, an architecture transformers can't load from a GGUF to train "
                       f"(it loads {', '.join(supported)}): give the model's HF folder instead (or, in a run, "
                       "set train.enabled = false to only generate with it)")
    if not info.chat_template:
        raise BadInput(f"{path} carries no chat template (tokenizer.chat_template), which training formats "
                       "every sample with: give a GGUF that has one, or the model's HF folder")


def derive_hf_checkpoint(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF into an HF folder (safetensors, tokenizer, chat template), atomically.

    transformers reads the GGUF; the quantization_config it attaches makes
    save_pretrained refuse, so the weights move into a model built from a clean
    config. Saved in float32: the dequantized values are not exact in 16 bits,
    and this checkpoint is the base every LoRA is trained and merged on.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantizer's own progress bar
    info = read_gguf(gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if info.chat_template:
        tok.chat_template = info.chat_template
    # transformers' GGUF tokenizer import gets the special tokens wrong (SmolLM2: EOS = <|im_start|>):
    # take them from the GGUF's own metadata.
    meta = info.metadata
    tok.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    for role in ("bos", "eos", "unknown", "padding"):
        tid = meta.get(f"tokenizer.ggml.{role}_token_id")
        if tid is not None:
            attr = {"unknown": "unk", "padding": "pad"}.get(role, role)
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(int(tid)))
    model.generation_config.eos_token_id = info.eos_token_id
    model.generation_config.bos_token_id = meta.get("tokenizer.ggml.bos_token_id")
    model.generation_config.pad_token_id = meta.get("tokenizer.ggml.padding_token_id")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if meta.get("tokenizer.ggml.model") == "gpt2":
            _repair_byte_level_bpe(tmp / "tokenizer.json", meta.get("tokenizer.ggml.pre"))
        if meta.get("tokenizer.ggml.model") == "llama":
            _keep_sentencepiece_vocab(tmp, read_gguf(gguf, keep_arrays=True).metadata)
    return out


# llama.cpp pre-tokenizer names -> the Hugging Face pre-tokenizer that splits text the same way.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "gpt-2": _BYTE_LEVEL,
}


def _repair_byte_level_bpe(path: Path, pre: str | None) -> None:
    """Make the imported tokenizer a plain byte-level BPE again.

    transformers rebuilds a GGUF "gpt2" vocabulary with byte fallback and a
    SentencePiece-style decoder. Left so, llama.cpp's converter reads it as a
    Llama SentencePiece vocabulary (and the exported GGUF can't tokenize), and
    the splitting of digits differs from llama.cpp's. Restore byte-level BPE
    with llama.cpp's pre-tokenizer, so training, conversion and serving
    tokenize alike.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    data["normalizer"] = None
    if pre in _PRE_TOKENIZERS:
        data["pre_tokenizer"] = _PRE_TOKENIZERS[pre]
    write_text_atomic(path, json.dumps(data, ensure_ascii=False))


_SPM_DEFAULT_SPACE_PREFIX = True  # llama.cpp prefixes a space for a "llama" vocabulary that does not say


def _keep_sentencepiece_vocab(folder: Path, meta: dict) -> None:
    """Give llama.cpp's converter the GGUF's own SentencePiece vocabulary back.

    Without a tokenizer.model the converter rebuilds a "llama" vocabulary from
    tokenizer.json with every score equal, so the exported GGUF merges tokens
    in another order, and without `add_prefix_space` llama.cpp prefixes a space
    the HF tokenizer does not: either way iteration GGUFs would tokenize unlike
    the checkpoint they came from. The GGUF holds every piece, score and type:
    write them as a SentencePiece model (the converter reads nothing else of
    it), and the GGUF's space prefix into tokenizer_config.json.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp

    model = sp.ModelProto()
    model.trainer_spec.model_type = sp.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score, as BPE does
    types = meta["tokenizer.ggml.token_type"]
    model.trainer_spec.byte_fallback = 6 in types
    for key, role in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        setattr(model.trainer_spec, key, int(meta.get(f"tokenizer.ggml.{role}_token_id", -1)))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", _SPM_DEFAULT_SPACE_PREFIX))
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = space_prefix
    model.normalizer_spec.remove_extra_whitespaces = False
    # llama.cpp numbers its token types as SentencePiece numbers piece types (1 normal ... 6 byte).
    for piece, score, kind in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], types):
        model.pieces.add(piece=piece, score=score, type=kind)
    write_bytes_atomic(folder / "tokenizer.model", model.SerializeToString())
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["add_prefix_space"] = space_prefix  # what llama.cpp's converter writes as the GGUF's space prefix
    write_json_atomic(config_path, config)
