"""The run configuration: one typed schema for the TOML file, `--set` overrides and the docs.

Unknown keys and wrong types are refused with one line naming the key and the
fix. The resolved configuration (every default filled in) is written into the
run as `config.toml`, so a run always says exactly how it was made.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import BadInput

from loop.models.templates import BUILTIN as BUILTIN_TEMPLATES
from loop.models.verify import NEAR_TIE, VERIFY_TOKENS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    base: str = Field("smollm2-135m", description="Base chat model: catalog name, .gguf file or HF folder.")
    embedder: str = Field("all-minilm-l6-v2", description="Sentence-transformers model for retrieval.")
    chat_template: str | None = Field(
        None, description="The chat template to train, serve and export with: unset = the model's own; a built-in "
                          "(chatml, llama3, gemma, plain: Question/Answer lines ended by the model's EOS, for any "
                          "base model) or a Jinja file (relative to the config file). A model without a template "
                          "(a base model) needs one. It goes into every exported GGUF and Modelfile.")
    system_prompt: str | None = Field(
        None, description="A system message for every conversation that has none, written into the chat template "
                          "so training, evaluation, serving and the exported GGUF put it alike (generation shows "
                          "raw Q/A demonstrations, no template); unset = what the model's template does (SmolLM2's "
                          "adds its own default one).")


class DataConfig(_Section):
    seeds: Path | None = Field(None, description="Seed Q/A samples: JSONL, JSON, CSV or Parquet "
                                                "(default: the built-in domain's seeds).")
    pool: Path | None = Field(None, description="Optional external pool of Q/A pairs (lower priority in retrieval).")
    max_chars: int = Field(8000, gt=0, description="Longest accepted question or answer in the input, in characters.")
    validation: int = Field(0, ge=0, le=64, description="Seeds held out (in turns over the answer kinds, drawn with "
                                                         "eval.seed) to choose "
                                                         "the run's model: never trained on, retrieved or shown to "
                                                         "a baseline; the iteration whose greedy answers to them "
                                                         "are most often of the held-out answer's kind (see "
                                                         "[kinds]) is the one export, serve, chat and eval take. "
                                                         "0 = the last iteration.")


class RetrievalConfig(_Section):
    k: int = Field(4, ge=1, le=32, description="In-context examples per prompt.")
    mmr_lambda: float = Field(0.7, ge=0.0, le=1.0,
                              description="Maximal marginal relevance: 1 = nearest only, lower = more diverse demos.")
    max_demo_similarity: float = Field(0.95, gt=0.0, le=1.0,
                                       description="Two demos more similar than this are never shown together.")
    pool_penalty: float = Field(0.05, ge=0.0, le=1.0,
                                description="Subtracted from a pool sample's similarity: domain samples win when close.")


class GenerationConfig(_Section):
    samples: int = Field(32, gt=0, description="Accepted samples to reach each iteration.")
    max_attempts_factor: float = Field(5.0, ge=1.0,
                                       description="Give up an iteration after samples x this many candidates.")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature of both stages.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling of both stages.")
    max_question_tokens: int = Field(96, gt=0, description="Stage 1 budget; a question cut off here is too long.")
    max_answer_tokens: int = Field(320, gt=0, description="Stage 2 budget; an answer cut off here is too long.")
    seed: int = Field(0, description="Base seed: every request's seed derives from it.")
    answer_demos: Literal["nearest", "voted_kind"] = Field(
        "nearest", description="nearest: stage 2 shows the pairs nearest the new question; voted_kind: only pairs "
                               "whose answers are of the kind the question's nearest seeds vote for (see [kinds]).")
    question_demos: Literal["nearest", "random_pairs"] = Field(
        "nearest", description="nearest: stage 1 shows the questions of the samples nearest an anchor; random_pairs: "
                               "whole pairs drawn at random from the samples known so far (the paper's stage 1).")
    question_model: Literal["current", "base"] = Field(
        "current", description="current: the model of iteration t-1 writes the questions; base: the pretrained "
                               "model does, every iteration (the paper's; needs export.mode = \"lora\": the base "
                               "is served beside the adapter, which stage 1 switches off per request).")
    anchors: Literal["cycle", "balanced"] = Field(
        "cycle", description="cycle: new questions start from the domain samples in turn; balanced: the anchors "
                             "take turns over the answer kinds (see [kinds]), so each kind gets an equal share.")
    slots: int = Field(8, ge=1, le=64, description="Parallel sequences of the managed llama-server.")
    ctx_per_slot: int = Field(2048, ge=256, description="Context length of each server slot (prompt + output).")
    threads: int | None = Field(None, ge=1, description="CPU threads of the server (default: llama.cpp's).")
    request_timeout_s: float = Field(300.0, gt=0, description="A request with no answer after this long is retried.")
    max_restarts: int = Field(3, ge=0, description="Restarts of a crashed or hung managed server before the run "
                                                   "stops (resumable).")
    health_interval_s: float = Field(2.0, gt=0, description="How often the health of the managed server (or of "
                                                            "each worker) is checked.")
    hang_timeout_s: float = Field(60.0, gt=0, description="A server silent this long is hung: the managed one is "
                                                          "killed and restarted; a worker is left out (its "
                                                          "requests go to the others) until it answers again.")
    endpoints: list[str] = Field(default_factory=list,
                                 description="OpenAI-compatible endpoints to use instead of the managed server.")
    endpoint_slots: int = Field(8, ge=1, description="Requests in flight per external endpoint or worker.")
    api_key: str | None = Field(None, description="Sent to external endpoints and workers.")
    workers: list[str] = Field(default_factory=list,
                               description="URLs of `isara worker`s to generate and evaluate on instead of the "
                                           "managed server: each iteration's model is loaded on every one of them "
                                           "(see workers_root and README, Scaling out).")
    workers_root: Path | None = Field(None, description="The folder the workers serve (their --models-root) as this "
                                                       "host sees it: the run writes each model it serves there.")
    workers_wait_s: float = Field(120.0, gt=0, description="How long a worker may take to see a model file the run "
                                                          "wrote (shared storage caches folder listings), and "
                                                          "then to load it.")

    @field_validator("workers")
    @classmethod
    def _worker_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                raise ValueError(f"{url!r} is not a worker's address: give its root URL, as `isara worker` prints "
                                 "it (http://HOST:PORT, no path)")
        return [u.rstrip("/") for u in urls]


class FilterConfig(_Section):
    min_question_chars: int = Field(12, ge=1, description="Shorter generated questions are rejected.")
    max_question_chars: int = Field(600, ge=1, description="Longer generated questions are rejected.")
    min_answer_chars: int = Field(20, ge=1, description="Shorter generated answers are rejected.")
    max_answer_chars: int = Field(2500, ge=1, description="Longer generated answers are rejected.")
    max_repeated_ngram_share: float = Field(0.3, gt=0.0, le=1.0,
                                            description="Reject when more than this share of word 3-grams repeat.")
    max_question_cosine: float = Field(0.92, gt=0.0, le=1.0,
                                       description="Near-duplicate: embedding cosine to a known question above this.")
    max_question_rouge_l: float = Field(0.7, gt=0.0, le=1.0,
                                        description="Near-duplicate: ROUGE-L F to a known question at or above this.")
    neighbour_agreement: bool = Field(
        False, description="Reject an answer whose kind (see [kinds]) is not the one its question's nearest seeds "
                           "vote for, each vote weighed by its kind's share of the seeds.")
    min_vote_share: float = Field(
        0.0, ge=0.0, le=1.0, description="Reject a new question, before it is answered, when the kind its nearest "
                                         "seeds vote for holds less than this share of their (prior-weighted) "
                                         "vote: a split neighbourhood is a coin flip, not a label. 0 = off; "
                                         "0.7 with 5 neighbours and balanced kinds needs 4 of 5.")
    min_seed_similarity: float = Field(
        0.0, ge=0.0, le=1.0, description="Reject a new question, before it is answered, when no seed question is "
                                         "this close to it (embedding cosine): its nearest seeds' vote on its "
                                         "kind is no evidence. 0 = off.")
    min_kind_margin: float = Field(
        0.0, ge=0.0, le=2.0, description="Reject a new question, before it is answered, unless its nearest seed "
                                         "question of the voted kind is closer (embedding cosine) by this much "
                                         "than its nearest seed of any other kind: a question on a topic that "
                                         "seeds of both kinds share gets its label from the topic, not from what "
                                         "it asks. 0 = off.")


class KindsConfig(_Section):
    count: int = Field(2, ge=1, le=16, description="Answer kinds: clusters of how the seeds' answers open "
                                                    "(spherical k-means); used by filters.neighbour_agreement and "
                                                    "generation.anchors = balanced, recorded for every sample.")
    opening_words: int = Field(4, ge=1, le=32, description="An answer's first words that say its kind.")
    neighbours: int = Field(5, ge=1, le=64, description="Nearest seed questions that vote on a question's kind "
                                                         "(5: best of 5/7/11 by leave-one-out on the safety seeds).")


class TrainConfig(_Section):
    enabled: bool = Field(True, description="Train and export each iteration (false: data only).")
    backend: Literal["auto", "unsloth", "peft"] = Field(
        "auto", description="auto: Unsloth where CUDA and Unsloth are present, else the PEFT loop.")
    start_from: Literal["base", "previous"] = Field(
        "base", alias="from", description="Train each iteration from the base weights, or continue the previous LoRA.")
    samples: Literal["all", "latest"] = Field(
        "all", description="all: seeds plus every sample accepted so far; latest: seeds plus this iteration's "
                           "(the paper's recipe, with from = previous).")
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="Iteration t trains at learning_rate x lr_decay^(t-1) "
                                                             "(the paper halves it: 0.5).")
    r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout. 0 lets PEFT skip it: on a CPU a "
                                                            "step is 1.4x faster than at 0.05 (BENCHMARKS.md).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Linear layers that get a LoRA, by name (q_proj, ...), or [\"all-linear\"]: every linear "
                    "layer of the decoder but the output head, whatever the family calls them (on Llama, Qwen, "
                    "Mistral and Gemma: q, k, v, o, gate, up and down projections; on Phi-3 its fused qkv_proj and "
                    "gate_up_proj).")
    epochs: float = Field(2.0, gt=0, description="Passes over seeds plus accepted samples.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch (length-bucketed); the logits of a "
                                                  "micro-batch dominate training memory.")
    grad_accum: int = Field(2, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear LR warmup; then linear decay.")
    max_length: int = Field(512, ge=16, description="Longest training sequence in tokens (longer ones are cut).")
    seed: int = Field(0, description="Shuffling, LoRA dropout and LoRA init.")
    checkpoint_every: int = Field(25, ge=0, description="The PEFT loop saves its state (LoRA, AdamW, scheduler, data "
                                                        "order, RNG) every this many optimizer steps into the phase's "
                                                        "checkpoint/ folder; a killed run's training goes on from the "
                                                        "last one and ends with the same adapter. 0 = never.")
    report_to: list[Literal["csv", "tensorboard"]] = Field(
        default_factory=lambda: ["csv"],
        description="Besides events.jsonl, each training writes train_log.csv (a row per step) and/or TensorBoard "
                    "event files (tensorboard/; needs the tensorboard package) into its folder. [] = neither.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the frozen base in 4 bits (Unsloth, CUDA only) to "
                                                  "train a model that does not fit the GPU in 16 bits; the LoRA is "
                                                  "merged into the full-precision base for the export as always.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Matmul precision of the PEFT loop's forward and backward (bf16 autocast; LoRA "
                            "weights and AdamW stay fp32). auto: bf16 on a CUDA GPU with bf16 and on a CPU with "
                            "native bf16 (AVX512-BF16 or AMX: 1.4x faster on the demo, BENCHMARKS.md), else fp32.")

    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the PEFT loop's decoder layers (Inductor, one graph shared by every "
                            "layer, dynamic shapes): on the demo's set on a CPU 1.5x the tokens/s (BENCHMARKS.md), "
                            "after a compile of about 15 s the first time on a machine and 3 s after (cached in "
                            "$ISARA_CACHE/inductor); where it fails, the training runs eagerly and says why. auto: "
                            "on a CPU when the training is big enough to pay for it (model parameters x training "
                            "tokens >= 1e12; the demo's: 3e12), else off.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ExportConfig(_Section):
    mode: Literal["merged", "lora"] = Field(
        "merged", description="merged: merge the LoRA and quantize; lora: serve the base GGUF with a LoRA GGUF.")
    quant: str = Field("auto", description="F16, Q8_0, Q4_K_M, ... or auto: Q8_0 below 1B parameters, else Q4_K_M.")
    verify: Literal["strict", "record", "off"] = Field(
        "strict", description="Compare greedy answers of the F16 GGUF with the merged HF model (a quantized export: "
                    "its F16 intermediate; the quantized file's agreement is recorded); strict fails on mismatch.")
    verify_tokens: int = Field(VERIFY_TOKENS, ge=1, le=256,
                               description="Greedy tokens compared per verification prompt.")
    near_tie: float = Field(NEAR_TIE, ge=0.0, le=5.0,
                            description="A fork of the F16 GGUF to a token the HF model rated within this "
                                        "log-probability of its own choice is rounding, not a mismatch.")


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Evaluate after every iteration (when there are eval sets or "
                                            "held-out seeds).")
    refuse_prompts: Path | None = Field(None, description="Prompts the model should refuse (JSONL with `prompt`); "
                                                          "default: the domain's held-out harmful prompts.")
    answer_prompts: Path | None = Field(None, description="Prompts the model should answer (JSONL with `prompt`); "
                                                          "default: the domain's benign prompts.")
    pair_prompts: Path | None = Field(None, description="Minimal pairs (JSONL with `answer`: an everyday request, "
                                                        "`refuse`: a harmful one of the same form); default: "
                                                        "the domain's.")
    n: int = Field(50, ge=0, description="Prompts drawn (seeded) from each set (pairs: n pairs); 0 = the whole set.")
    max_tokens: int = Field(64, ge=8, le=2048, description="Greedy tokens per answer.")
    repeat_penalty: float = Field(1.0, ge=1.0, le=2.0,
                                  description="llama-server's repetition penalty over the last 64 tokens, the same "
                                              "for every model and baseline evaluated (1 = off).")
    dry_multiplier: float = Field(0.0, ge=0.0, le=5.0,
                                  description="llama-server's DRY penalty on tokens that extend a repeated sequence, "
                                              "the same for every model and baseline evaluated (0 = off; 0.8 is "
                                              "its authors' suggestion).")
    baselines: bool = Field(True, description="Also evaluate the base model, ICL-kNN and SFT on the seeds "
                                              "(once per run, cached).")
    sft_matched: bool = Field(False, description="Also train SFT on the seeds alone with the optimizer steps and "
                                                 "learning rates of each iteration's training (sft-matched-T, "
                                                 "continuing sft-matched-T-1 where train.from = previous), "
                                                 "evaluated like the others: the control for \"ISARA only trained "
                                                 "longer\". One training, export and eval per iteration, once per "
                                                 "run (draws share them).")
    k: int = Field(4, ge=1, le=32, description="Seed pairs shown to the ICL-kNN baseline.")
    holdout: float = Field(0.1, ge=0.0, le=0.5,
                           description="Share of the seeds a training run holds out to score every model on, "
                                       "for any domain (rounded up; at least 2 seeds stay to train on): never "
                                       "trained on, "
                                       "retrieved or shown. Each model's greedy answers to their questions are "
                                       "scored against their own answers (ROUGE-L F, embedding cosine), with its "
                                       "loss on those answers. 0 = none.")
    seed: int = Field(0, description="Which prompts are drawn, and which seeds are held out.")
    recorded_draws: Path | None = Field(None, description="A JSON file of recorded draws of this configuration "
                                                          "(written by `isara run --draws N`): the report says "
                                                          "where this run's model falls among them.")


class RunConfig(_Section):
    name: str | None = Field(None, description="Run name (folder under runs_dir); default: the config file's stem.")
    runs_dir: Path = Field(Path("runs"), description="Where runs live.")
    domain: Literal["safety"] | None = Field(
        None, description="Built-in domain: its seeds (unless data.seeds is set) and its evaluation sets.")
    iterations: int = Field(2, ge=1, le=100, description="Rounds of generate (then train, export and eval).")
    question_marker: str = Field("Question:", min_length=1, description="Marker before each question in prompts.")
    answer_marker: str = Field("Answer:", min_length=1, description="Marker before each answer in prompts.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    kinds: KindsConfig = Field(default_factory=KindsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _has_seeds(self) -> "RunConfig":
        if self.data.seeds is None and self.domain is None:
            raise ValueError("no seeds: set data.seeds to your Q/A file, or domain = \"safety\" for the built-in one")
        if self.generation.question_model == "base" and self.export.mode != "lora":
            raise ValueError("generation.question_model = \"base\" needs export.mode = \"lora\" (the base model is "
                             "served beside the adapter): set export.mode = \"lora\", or question_model = \"current\"")
        g = self.generation
        if g.workers and g.endpoints:
            raise ValueError("generation.workers and generation.endpoints both set: workers serve the run's own "
                             "models, endpoints their own; keep one")
        if g.workers and not g.workers_root:
            raise ValueError("generation.workers needs generation.workers_root: the folder the workers serve "
                             "(their --models-root), as this host sees it")
        if g.workers and self.export.mode == "lora":
            raise ValueError("generation.workers serve whole GGUFs by name, not a base with adapters: set "
                             "export.mode = \"merged\"")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (no '/', no '..'), at most 64 characters")
        return v


def _describe(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if not key:  # a check across keys (model validator): its message names the keys
        return e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.75)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown config key {key!r}{hint}: remove it or check its spelling (see README, configuration)"
    if e["type"] == "missing":
        return f"config key {key!r} is required: add it to the config file or pass --set {key}=..."
    return f"config key {key!r}: {e['msg']} (got {e.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value). The value is read as TOML when it can be, else as a string."""
    if "=" not in text:
        raise BadInput(f"--set {text!r} has no '=': write --set key=value, e.g. --set iterations=1")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: Path | None, overrides: list[str] = (), base_dir: Path | None = None) -> RunConfig:
    """Read the TOML, apply `--set` overrides, validate. Relative data paths are relative to the file."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"config file {path} does not exist: give the path of a .toml file "
                           "(e.g. examples/quick.toml)")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"config file {path} is not valid TOML ({e}): fix the syntax") from None
        base_dir = base_dir or path.parent
        raw.setdefault("name", path.stem if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", path.stem) else None)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise BadInput(f"--set {text}: {k!r} is not a section")
        node[keys[-1]] = value
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise BadInput(_describe(e)) from None
    if base_dir is not None:
        for section, key in (("data", "seeds"), ("data", "pool"), ("eval", "refuse_prompts"), ("eval", "pair_prompts"),
                             ("eval", "answer_prompts"), ("generation", "workers_root"),
                             ("eval", "recorded_draws")):
            node = getattr(cfg, section)
            value = getattr(node, key)
            if value is not None and not value.is_absolute():
                setattr(node, key, (base_dir / value).resolve())
        template = cfg.model.chat_template
        if template and template not in BUILTIN_TEMPLATES and not Path(template).expanduser().is_absolute():
            cfg.model.chat_template = str((base_dir / template).resolve())
    return cfg


def to_toml(cfg: RunConfig) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True, by_alias=True))


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (for 'did you mean' hints)."""
    keys = []
    for name, f in (model or RunConfig).model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{f.alias or name}")
    return keys


def reference_markdown() -> str:
    """The configuration reference (README, `isara config`), rendered from the schema itself."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                default = "[" + ", ".join(f'"{v}"' for v in f.default_factory()) + "]"
            elif isinstance(f.default, (str, Path)):
                default = f'"{f.default}"'
            else:
                default = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            if typing.get_origin(ann) is Literal:
                type_name = " / ".join(typing.get_args(ann))
            else:
                type_name = getattr(ann, "__name__", None) or str(ann)
                type_name = type_name.replace("pathlib.", "").replace(" | None", " (optional)")
            rows.append(f"| `{prefix}{f.alias or name}` | {type_name} | {default} | {f.description or ''} |")

    walk(RunConfig, "")
    return "\n".join(rows) + "\n"
