"""A GGUF file made into the HF checkpoint LoRA training needs.

transformers reads the GGUF and dequantizes it; what it gets wrong is repaired
here, so that training (HF tokenizer), conversion back to GGUF (llama.cpp's
converter reads the folder) and serving (llama.cpp) tokenize alike. Whether
the result answers like the GGUF is checked after, against llama-server
(`loop.models.verify.verify_derived`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from server.errors import BadInput
from server.gguf import read_gguf

from loop.files import atomic_dir, write_bytes_atomic, write_json_atomic, write_text_atomic
from loop.models.memory import BF16_ABOVE

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
                       "every sample with: set model.chat_template (or `isara models add --chat-template`) to chatml, "
                       "llama3, gemma, plain or a Jinja file")


def derive_hf_checkpoint(gguf: Path, out: Path, chat_template: str | None = None) -> Path:
    """Dequantize a GGUF into an HF folder (safetensors, tokenizer, chat template), atomically.

    transformers reads the GGUF; the quantization_config it attaches makes
    save_pretrained refuse, so the weights move into a model built from a clean
    config. Saved in float32 up to 500M parameters (the dequantized values are
    not exact in 16 bits, and this checkpoint is the base every LoRA is trained
    and merged on), in bf16 above.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantizer's own progress bar
    info = read_gguf(gguf)
    gemma = info.architecture in _GEMMA and info.metadata.get("tokenizer.ggml.model") == "llama"
    with _each_gguf_parsed_once():
        if gemma:  # transformers reads Gemma's BPE vocabulary as a Unigram one: "▁capital" -> "▁c", "ap", "it", "al"
            tok = _gemma_tokenizer(read_gguf(gguf, keep_arrays=True).metadata)
        else:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        _repair_config(config, info.metadata)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config,
                                                      dtype=torch.float32, trust_remote_code=False)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    # float32 where it is cheap; bf16 above 500M parameters, where float32 would double the disk and the
    # memory of every later load for no measurable gain over the GGUF's own (at most 16-bit) precision.
    dtype = torch.bfloat16 if info.params > BF16_ABOVE else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    del loaded
    if info.chat_template or chat_template:  # the GGUF's own, else the one given for a base model
        tok.chat_template = info.chat_template or chat_template
    # transformers' GGUF tokenizer import gets the special tokens wrong (SmolLM2: EOS = <|im_start|>):
    # take them from the GGUF's own metadata.
    meta = info.metadata
    tok.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    for role in ("bos", "eos", "unknown", "padding"):
        tid = meta.get(f"tokenizer.ggml.{role}_token_id")
        if tid is not None:
            attr = {"unknown": "unk", "padding": "pad"}.get(role, role)
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(int(tid)))
    eos = [info.eos_token_id]
    if gemma and "<end_of_turn>" in tok.get_vocab():  # llama.cpp ends a turn there too (by name: no GGUF key)
        eos.append(tok.convert_tokens_to_ids("<end_of_turn>"))
    model.generation_config.eos_token_id = eos if len(eos) > 1 else info.eos_token_id
    model.generation_config.bos_token_id = meta.get("tokenizer.ggml.bos_token_id")
    model.generation_config.pad_token_id = meta.get("tokenizer.ggml.padding_token_id")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if meta.get("tokenizer.ggml.model") == "gpt2":
            _repair_byte_level_bpe(tmp / "tokenizer.json", meta.get("tokenizer.ggml.pre"))
        if meta.get("tokenizer.ggml.model") == "llama":
            _keep_sentencepiece_vocab(tmp, read_gguf(gguf, keep_arrays=True).metadata, rebuild=not gemma)
        _drop_tokens_beyond(tmp / "tokenizer.json", info.vocab_size)
    return out


@contextlib.contextmanager
def _each_gguf_parsed_once():
    """transformers parses the GGUF's header afresh for the tokenizer, the config, the model's config and the
    weights: four parses, each walking every token of the vocabulary (11 s apiece for Qwen's 151,646 tokens on
    2 cores). Within a derivation each file is parsed once; the reader is read-only (a memmap)."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # load_gguf_checkpoint imports it from the module at each call
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _drop_tokens_beyond(path: Path, n_vocab: int | None) -> None:
    """transformers' GGUF tokenizer import adds a family's usual tokens whether the file has them or not
    (Phi-3: <|placeholder1|> ... at ids past a smaller vocabulary); the model has no row for them and
    llama.cpp's converter fails on them: keep only the GGUF's own tokens."""
    if n_vocab is None:
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    kept = [t for t in data.get("added_tokens", []) if t["id"] < n_vocab]
    if len(kept) != len(data.get("added_tokens", [])):
        data["added_tokens"] = kept
        write_text_atomic(path, json.dumps(data, ensure_ascii=False))


def _repair_config(config, meta: dict) -> None:
    """What transformers' GGUF config import leaves out: the attention head width where it is not
    hidden_size / heads (Qwen 3 keeps the class default of 128, so any other width fails to load), and
    Gemma's attention scale."""
    arch = meta.get("general.architecture")
    key_length = meta.get(f"{arch}.attention.key_length")
    if key_length and getattr(config, "head_dim", None) not in (None, key_length):
        config.head_dim = int(key_length)
    # Gemma 2/3 scale attention by query_pre_attn_scalar, which no GGUF key holds: llama.cpp uses the head
    # width (hidden / heads for the 27B models: Gemma 2's 46 layers, Gemma 3's 62), transformers its class
    # default of 256.
    if key_length and hasattr(config, "query_pre_attn_scalar"):
        layers, hidden, heads = (meta.get(f"{arch}.{k}") for k in ("block_count", "embedding_length",
                                                                   "attention.head_count"))
        is_27b = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
        config.query_pre_attn_scalar = hidden // heads if is_27b else int(key_length)


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


_GEMMA = ("gemma", "gemma2", "gemma3")
# llama.cpp's token types, which are SentencePiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _gemma_tokenizer(meta: dict):
    """Gemma's tokenizer as llama.cpp runs it from the GGUF: a byte-fallback BPE whose merges are ranked by the
    pieces' scores (as transformers' own converter builds it from Gemma's tokenizer.model), control tokens
    matched whole as special tokens, user-defined ones (runs of spaces or newlines) whole as plain ones."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    tokens, scores, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    skip = {t for t, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE)}
    merges = generate_merges(vocab, [(t, s) for t, s, kind in zip(tokens, scores, types) if kind == _NORMAL],
                             skip_tokens=skip)
    token = lambda role: tokens[int(meta[f"tokenizer.ggml.{role}_token_id"])] \
        if f"tokenizer.ggml.{role}_token_id" in meta else None  # noqa: E731
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, unk_token=token("unknown"), bos_token=token("bos"),
                         eos_token=token("eos"), pad_token=token("padding"), add_bos_token=add_bos,
                         add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
    tok._tokenizer.add_tokens([AddedToken(t, special=kind == _CONTROL, normalized=False)
                               for t, kind in zip(tokens, types) if kind in (_CONTROL, _USER_DEFINED)])
    tok.add_bos_token = add_bos
    tok.update_post_processor()
    return tok


def _keep_sentencepiece_vocab(folder: Path, meta: dict, rebuild: bool = True) -> None:
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
        # A user-defined piece (Gemma's runs of spaces) is stored in the GGUF as its text; SentencePiece
        # writes its spaces as U+2581, which is what the converter reads back.
        model.pieces.add(piece=piece.replace(" ", "\u2581") if kind == _USER_DEFINED else piece, score=score,
                         type=kind)
    write_bytes_atomic(folder / "tokenizer.model", model.SerializeToString())
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["add_prefix_space"] = space_prefix  # what llama.cpp's converter writes as the GGUF's space prefix
    write_json_atomic(config_path, config)
    if not rebuild:
        return
    # transformers' own tokenizer.json for it splits text unlike llama.cpp (Phi-3: no spaces at all); families
    # whose tokenizer class transformers forces to read that file would train on it. Rebuild it from the
    # SentencePiece model, with llama.cpp's space prefix at the start and after each special token (legacy).
    from transformers import LlamaTokenizer

    rebuilt = LlamaTokenizer.from_pretrained(folder, legacy=space_prefix, add_prefix_space=space_prefix)
    rebuilt.save_pretrained(folder)
