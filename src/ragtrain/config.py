"""One typed config, loaded from params.yaml.

Each top-level section of params.yaml maps to one frozen dataclass. ``load_config`` rejects
unknown keys, wrong types and out-of-range values, naming the dotted key and the bad value.
params.yaml is read as YAML 1.2 (ruamel), as DVC reads it, so ``1e-4`` is a float for both.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ragtrain.errors import ConfigError
from ragtrain.schema import build

DEFAULT_PARAMS = Path("params.yaml")
SQUAD_V11_DEV_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"
SQUAD_V11_DEV_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"


def _f(default: Any, **checks: Any) -> Any:
    """A dataclass field with range checks: ge, gt, le, lt, pattern, min_items."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=checks)
    return field(default=default, metadata=checks)


@dataclass(frozen=True)
class DataConfig:
    # A local path (file or folder; relative to the repo root) or an http(s) URL, or a list of
    # them: mirrors of one file, tried in order (the first found or downloaded; sha256 pins all).
    source: str | list[str] = SQUAD_V11_DEV_URL
    # Pinned sha256 of the file, or of its decompressed payload (.gz, one-member .zip); "" = none.
    sha256: str = _f(SQUAD_V11_DEV_SHA256, pattern=r"^([0-9a-f]{64})?$")
    format: Literal["auto", "squad", "jsonl", "beir"] = "auto"
    download_timeout_s: float = _f(60.0, gt=0)
    chunk_tokens: int = _f(0, ge=0)  # chunking: 0 = off (one passage per paragraph / document)
    chunk_overlap: int = _f(0, ge=0)
    # "whitespace", or a Hugging Face tokenizer (a local path, the bundled "all-MiniLM-L6-v2",
    # or a hub name when online): chunk by that tokenizer's tokens.
    chunk_tokenizer: str = "whitespace"
    dedup_passages: bool = True
    split_seed: int = 0
    dev_fraction: float = _f(0.1, ge=0, lt=1)
    test_fraction: float = _f(0.2, gt=0, lt=1)

    def __post_init__(self) -> None:
        if self.chunk_tokens and self.chunk_overlap >= self.chunk_tokens:
            raise ConfigError(f"chunk_overlap: must be smaller than chunk_tokens "
                              f"({self.chunk_tokens}), got {self.chunk_overlap}")
        if self.dev_fraction + self.test_fraction >= 1:
            raise ConfigError(f"dev_fraction + test_fraction: must leave documents for training, "
                              f"got {self.dev_fraction} + {self.test_fraction}")


@dataclass(frozen=True)
class HybridConfig:
    fusion: Literal["rrf", "weighted"] = "weighted"
    rrf_k: int = _f(60, ge=1)
    dense_weight: float = _f(0.6, ge=0, le=1)  # weighted fusion: w*dense + (1-w)*bm25 (min-max)
    depth: int = _f(100, ge=1)  # candidates taken from each retriever before fusion


@dataclass(frozen=True)
class RetrieverConfig:
    model_name: str = "all-MiniLM-L6-v2"  # the bundled copy offline; a folder or hub name online
    pooling: Literal["mean", "cls"] = "mean"
    shared_encoder: bool = True  # False: separate query / passage towers (DPR style)
    query_max_length: int = _f(64, ge=8)
    passage_max_length: int = _f(256, ge=8)
    # true: attention-probability dropout too (1.3-1.5x dearer CPU steps; dev R@1 within noise)
    attention_dropout: bool = False
    # = retrieval.losses.LOSSES keys; distill: in_batch_nll + distill_weight x KL(reranker ||
    # bi-encoder) over each question's candidates (scored by the teacher_scores stage)
    loss: Literal["in_batch_nll", "cosine", "distill"] = "in_batch_nll"
    temperature: float = _f(0.05, gt=0)
    distill_weight: float = _f(1.0, ge=0)  # loss distill: the KL term's weight
    distill_temperature: float = _f(1.0, gt=0)  # loss distill: reranker logits / this
    hard_negatives: Literal["none", "bm25", "dense", "both"] = "none"
    hard_negatives_per_query: int = _f(1, ge=0)
    hard_negative_depth: int = _f(20, ge=1)  # mine from this many top candidates
    hard_negative_margin: float = _f(0.0, ge=0)  # dense mining: skip negatives scored within it
    batch_size: int = _f(16, ge=2)  # gold passages per batch (each with its questions)
    questions_per_passage: int = _f(4, ge=1)  # questions sharing a passage's column per step
    group_by_document: int = _f(8, ge=0)  # passages per document run in a batch; 0 = random
    grad_accum_steps: int = _f(1, ge=1)
    # GradCache: embed the batch in chunks of this many texts (no graph), backpropagate the full
    # batch's loss chunk by chunk: the same gradient, chunk-sized activations; 0 = off
    grad_cache_chunk: int = _f(0, ge=0)
    lr: float = _f(5.0e-5, gt=0)
    weight_decay: float = _f(0.01, ge=0)
    warmup_ratio: float = _f(0.1, ge=0, lt=1)
    grad_clip: float = _f(1.0, ge=0)  # 0 = off
    epochs: int = _f(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: as the hardware has
    # inference (build-index, query encoding): torch (autocast per precision) | onnx (ONNX
    # Runtime fp32) | onnx_int8 (dynamic int8); retrieval/onnx_runtime.py
    runtime: Literal["torch", "onnx", "onnx_int8"] = "torch"
    max_steps: int = _f(0, ge=0)  # 0 = epochs decide
    eval_every: int = _f(0, ge=0)  # optimizer steps between dev evaluations; 0 = end of epoch
    checkpoint_every: int = _f(50, ge=1)
    early_stopping_patience: int = _f(0, ge=0)  # evaluations without improvement; 0 = off
    kind: Literal["dense", "bm25", "hybrid"] = "hybrid"  # what the RAG model retrieves with
    top_k: int = _f(1, ge=1)  # passages handed to the generator (and cited by the RAG model)
    hybrid: HybridConfig = field(default_factory=HybridConfig)


@dataclass(frozen=True)
class RerankerConfig:
    # A cross-encoder reordering the first stage's top `candidates` (retriever.kind); opt-in
    enabled: bool = False
    model_name: str = "all-MiniLM-L6-v2"  # bundled copy offline; a local folder or hub name online
    max_length: int = _f(256, ge=16)  # question + passage tokens (the passage is cut first)
    window_words: int = _f(40, ge=0)  # passages read as windows, scored by the best; 0 = whole
    window_stride: int = _f(0, ge=0)  # words between window starts; 0 = window_words // 2
    max_windows: int = _f(2, ge=0)  # per passage, windows read: its lexical best; 0 = all
    candidates: int = _f(10, ge=1)  # first-stage passages reranked per question
    fuse_weight: float = _f(0.5, ge=0, le=1)  # w*minmax(reranker) + (1-w)*minmax(first stage)
    train_candidates: int = _f(8, ge=2)  # per training question: the gold + negatives
    negatives_depth: int = _f(20, ge=1)  # negatives are drawn from BM25's top this many
    batch_questions: int = _f(4, ge=1)  # questions per batch (x train_candidates pairs)
    grad_accum_steps: int = _f(1, ge=1)
    lr: float = _f(3.0e-5, gt=0)
    head_lr: float = _f(1.0e-3, gt=0)  # the new scoring head (params the warm start lacks)
    weight_decay: float = _f(0.01, ge=0)
    warmup_ratio: float = _f(0.1, ge=0, lt=1)
    grad_clip: float = _f(1.0, ge=0)  # 0 = off
    epochs: int = _f(1, ge=1)
    max_steps: int = _f(0, ge=0)  # 0 = epochs decide
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = _f(0, ge=0)  # steps between dev evaluations (best on dev R@1); 0 = end
    dev_questions: int = _f(300, ge=0)  # dev questions reranked per evaluation; 0 = all
    checkpoint_every: int = _f(50, ge=1)
    early_stopping_patience: int = _f(0, ge=0)
    eval_batch_size: int = _f(64, ge=1)  # pairs per forward pass when reranking
    runtime: Literal["torch", "onnx", "onnx_int8"] = "torch"  # inference, as retriever.runtime
    INFERENCE_ONLY: ClassVar[tuple[str, ...]] = ("max_windows", "runtime")  # training ignores

    def __post_init__(self) -> None:
        if self.window_stride > self.window_words:  # words would be skipped
            raise ConfigError(f"window_stride: at most window_words ({self.window_words}), "
                              f"got {self.window_stride}")
        if self.negatives_depth < self.train_candidates - 1:
            raise ConfigError("negatives_depth: must be at least train_candidates - 1 ("
                              f"{self.train_candidates - 1}) to fill each list, got "
                              f"{self.negatives_depth}")


@dataclass(frozen=True)
class IndexConfig:
    kind: Literal["flat", "hnsw", "ivfpq"] = "flat"
    encode_batch_size: int = _f(64, ge=1)
    hnsw_m: int = _f(32, ge=2)
    hnsw_ef_construction: int = _f(80, ge=1)
    hnsw_ef_search: int = _f(64, ge=1)
    ivf_nlist: int = _f(64, ge=1)
    ivf_nprobe: int = _f(8, ge=1)
    pq_m: int = _f(16, ge=1)  # sub-quantizers; must divide the embedding dimension
    pq_bits: int = _f(8, ge=1, le=16)
    refine_k_factor: int = _f(0, ge=0)  # ivfpq: re-rank this x k PQ candidates exactly; 0 = off
    # what the re-ranking reads: flat (exact, 4 B/dim), fp16 (2 B/dim), sq8 (1 B/dim, trained)
    refine_store: Literal["flat", "fp16", "sq8"] = "flat"
    # build-index preflight: refuse a kind whose estimated memory exceeds this; 0 = MemAvailable
    max_memory_gb: float = _f(0.0, ge=0)
    # reuse unchanged passages' embeddings (cache/embeddings/, by text and encoder): a 1% edit
    # re-encodes ~1%. Off: under bf16 an embedding depends on its batch's padding (~1e-3), so a
    # warm-cache build can move a fresh clone's metrics' last digits (bench/incremental.py)
    embedding_cache: bool = False
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: faiss-gpu where it sees a GPU
    mmap: bool = False  # search the saved index from disk (memory-mapped): indexes past RAM
    # passages as windows of this many words, a vector each, scored by the best (MaxP: see
    window_words: int = _f(24, ge=0)  # retrieval/windows.py); 0 = one vector per passage
    window_stride: int = _f(0, ge=0)  # words between window starts; 0 = window_words // 2
    max_windows: int = _f(2, ge=0)  # per passage, windows read: its lexical best; 0 = all

    def __post_init__(self) -> None:
        if self.window_stride > self.window_words:  # words would be skipped
            raise ConfigError(f"window_stride: at most window_words ({self.window_words}), "
                              f"got {self.window_stride}")


@dataclass(frozen=True)
class GeneratorConfig:
    # copy: a BERT-style encoder warm start used as one prefix-LM with a copy (pointer) head, the
    # offline default (the bundled "all-MiniLM-L6-v2"); seq2seq: AutoModelForSeq2SeqLM (T5, BART);
    # causal: AutoModelForCausalLM (loss on the answer tokens only; chat template if it has one).
    # hf_rag: transformers' RagTokenForGeneration / RagSequenceForGeneration (rag_variant) reading
    # the passages ragtrain's retriever found (each passage its own encoder input).
    kind: Literal["copy", "seq2seq", "causal", "hf_rag"] = "copy"
    # auto: when the data has reference answers (retrieval-only data, e.g. BEIR, skips it with
    # DISABLED.json markers; the retriever is registered alone); false: never; true: required
    enabled: Literal["auto", True, False] = "auto"
    model_name: str = "all-MiniLM-L6-v2"  # bundled copy offline; a local folder or hub name online
    gguf_file: str = ""  # causal: a GGUF file inside model_name's folder (transformers gguf_file=)
    max_source_tokens: int = _f(256, ge=16)  # question + passages; passages share it fairly
    max_question_tokens: int = _f(48, ge=4)  # longer questions are cut (counted in metrics)
    max_answer_tokens: int = _f(16, ge=1)
    # seq2seq / causal: the prompt; {question} and {context} (the passages, each "title: text",
    # separated by a blank line). The copy model uses [CLS] question [SEP] passage [SEP] ... .
    template: str = "question: {question}\ncontext: {context}\nanswer:"
    gold_share: float = _f(0.5, ge=0, le=1)  # training examples with the gold passage forced in
    missed_target: Literal["empty", "answer"] = "empty"  # no gold/answer in input: "" | answer
    decoding: Literal["constrained", "greedy"] = "constrained"  # copy: constrained = a passage span
    num_beams: int = _f(2, ge=1, le=16)  # copy, constrained: beam search width (1 = greedy)
    # answering: read answer_from inputs of top_k passages each (1 = one); keep the answer of
    # best mean token log-prob - answer_null_weight * log p(empty) + answer_weight * score(1st)
    answer_from: int = _f(3, ge=1)
    answer_weight: float = _f(3.0, ge=0)
    answer_null_weight: float = _f(0.2, ge=0)
    batch_size: int = _f(16, ge=1)
    grad_accum_steps: int = _f(1, ge=1)
    lr: float = _f(1.0e-4, gt=0)
    new_params_lr: float = _f(1.0e-3, gt=0)  # copy head and LM-head parts the warm start lacks
    weight_decay: float = _f(0.01, ge=0)
    warmup_ratio: float = _f(0.06, ge=0, lt=1)
    grad_clip: float = _f(1.0, ge=0)
    epochs: int = _f(5, ge=1)
    max_steps: int = _f(0, ge=0)  # 0 = epochs decide
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = _f(418, ge=0)  # steps between dev evaluations (best on dev F1); 0 = end
    dev_questions: int = _f(0, ge=0)  # dev questions scored per evaluation; 0 = all
    checkpoint_every: int = _f(100, ge=1)
    early_stopping_patience: int = _f(0, ge=0)
    eval_batch_size: int = _f(32, ge=1)
    # seq2seq / causal: LoRA adapters (peft: pip install -e .[lora]) instead of full fine-tuning;
    # 0 = off. Saved merged into model/ (loading needs no peft) and as adapter/ beside it.
    lora_r: int = _f(0, ge=0)
    lora_alpha: float = _f(16.0, gt=0)
    lora_dropout: float = _f(0.05, ge=0, lt=1)
    # [] = peft's default for the architecture (attention q/v projections: c_attn for GPT-2, q/v
    # for T5, q_proj/v_proj for BART, Llama, ...), all linear layers when peft has none
    lora_target_modules: list[str] = _f([])
    rag_variant: Literal["token", "sequence"] = "token"  # hf_rag: RAG-Token | RAG-Sequence


@dataclass(frozen=True)
class JointConfig:
    # RAG trained as one model (train_rag, after train_generator): the answer's likelihood
    # marginalised over the top_k passages the trainable query encoder retrieves from the fixed
    # index; gradients reach the query encoder (through p(z|x)) and the generator, the passage
    # embeddings and index stay fixed. Off: the stage writes artifacts/rag_joint/DISABLED.json.
    enabled: bool = False
    marginal: Literal["sequence", "token"] = "sequence"  # RAG-Sequence | RAG-Token
    top_k: int = _f(4, ge=1)  # passages marginalised over per question
    temperature: float = _f(0.05, gt=0)  # p(z|x) = softmax(cos(e_q, e_z) / temperature)
    cosine_weight: float = _f(0.0, ge=0)  # auxiliary 1 - cos(e_q, e_gold); 0 = off
    batch_size: int = _f(4, ge=1)  # questions per step (each read with top_k passages)
    grad_accum_steps: int = _f(1, ge=1)
    retriever_lr: float = _f(1.0e-5, gt=0)  # the query encoder
    generator_lr: float = _f(3.0e-5, gt=0)
    weight_decay: float = _f(0.01, ge=0)
    warmup_ratio: float = _f(0.06, ge=0, lt=1)
    grad_clip: float = _f(1.0, ge=0)
    epochs: int = _f(1, ge=1)
    max_steps: int = _f(500, ge=0)  # 0 = epochs decide
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = _f(0, ge=0)  # steps between dev evaluations (best on dev F1); 0 = end
    dev_questions: int = _f(300, ge=0)  # dev questions answered per evaluation; 0 = all
    eval_at_start: bool = True  # the pipeline pair is a dev candidate, kept if no step beats it
    checkpoint_every: int = _f(50, ge=1)
    early_stopping_patience: int = _f(0, ge=0)
    eval_batch_size: int = _f(32, ge=1)
    # index refresh (rag-end2end / Atlas): the passage encoder trains too (p(z|x) from live
    # passage embeddings), the corpus re-encoded every refresh_every steps (0 = never)
    train_passages: bool = False
    refresh_every: int = _f(0, ge=0)

    def __post_init__(self) -> None:
        if self.refresh_every and not self.train_passages:
            raise ConfigError(f"refresh_every: the index only changes when train_passages is "
                              f"true, got {self.refresh_every} with train_passages false")


@dataclass(frozen=True)
class EvaluationConfig:
    split: Literal["dev", "test"] = "test"
    recall_ks: list[int] = _f([1, 5, 20, 100])
    rank_cutoff: int = _f(10, ge=1)  # MRR@k and nDCG@k


@dataclass(frozen=True)
class AbstentionConfig:  # "no answer" when the first passage's relevance is below a dev threshold
    enabled: bool = False
    dev_questions: int = _f(300, ge=1)  # dev questions, answerable and made unanswerable
    test_questions: int = _f(500, ge=1)  # test questions made unanswerable (correct abstentions)
    # w tried on dev in relevance - w x p(empty answer): the best, with its threshold (README)
    null_weights: list[float] = _f([0.0, 0.1, 0.2, 0.3, 0.5], ge=0, min_items=1)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log every stage run to MLflow
    # sqlite store under mlruns/ (artifacts in mlruns/artifacts), or a server: http://host:5000
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "ragtrain"


@dataclass(frozen=True)
class RegistryConfig:
    register: bool = True  # the register stage registers each new RAG model as `challenger`
    # registered: <model_name> (the composite RAG pyfunc), <model_name>-retriever, -generator
    model_name: str = _f("ragtrain-rag", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    primary_metric: str = _f("test/f1", pattern=r"^[/\w.\- ]+$")  # a key of the metrics files
    greater_is_better: bool = True
    min_gain: float = _f(0.0, ge=0)  # a challenger must beat the champion by more than this
    floor: float = 10.0  # the first champion must meet it (greater_is_better false: a ceiling)
    # a retriever-only model (no generator: data without answers) is judged on this instead
    retrieval_metric: str = _f("test/ndcg_at_10", pattern=r"^[/\w.\- ]+$")
    retrieval_floor: float = 0.0  # the first retriever-only champion must meet it


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    abstention: AbstentionConfig = field(default_factory=AbstentionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def __post_init__(self) -> None:
        if self.retriever.loss == "distill" and not self.reranker.enabled:
            raise ConfigError("retriever.loss: distill learns from the reranker's scores; set "
                              "reranker.enabled: true (or choose in_batch_nll)")
        if self.retriever.loss == "distill" and self.retriever.hard_negatives_per_query < 1:
            raise ConfigError("retriever.hard_negatives_per_query: loss distill needs >= 1 "
                              "teacher-scored negative per question, got 0")


def _yaml():
    from ruamel.yaml import YAML

    y = YAML(typ="safe", pure=True)
    y.allow_duplicate_keys = False
    return y


def read_yaml(path: Path) -> Any:
    """Parse a YAML 1.2 file; errors name the file and line."""
    from ruamel.yaml import YAMLError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return _yaml().load(io.StringIO(text))
    except YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, YAML-parsed value), as ``dvc exp run -S`` takes them."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    value = _yaml().load(io.StringIO(raw)) if raw.strip() else ""
    return key.strip(), value


def config_from_dict(raw: Any, source: str = "params") -> Config:
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    return build(Config, raw, "params")


def load_config(path: Path = DEFAULT_PARAMS, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read params.yaml (plus dotted overrides) into a validated Config."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    try:
        return config_from_dict(raw, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(data: Any) -> str:
    from ruamel.yaml import YAML

    y = YAML()
    y.default_flow_style = False
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def set_params(path: Path, assignments: Mapping[str, Any]) -> Config:
    """Edit params.yaml in place (comments kept), after validating the result; atomic."""
    from ruamel.yaml import YAML

    from ragtrain.io import atomic_write_text

    y = YAML()  # round-trip: keeps comments and order
    y.preserve_quotes = True
    doc = y.load(path.read_text(encoding="utf-8")) if path.exists() else {}
    plain = read_yaml(path) if path.exists() else {}
    for k, v in assignments.items():
        _set_dotted(plain, k, v)
    config_from_dict(plain, str(path))  # validate before touching the file
    for k, v in assignments.items():
        parts = k.split(".")
        node = doc
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    buf = io.StringIO()
    y.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    return load_config(path)

