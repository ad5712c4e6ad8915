"""Config dataclasses for each stage.

Defaults equal the paper's settings where it has one (``../shared/docs/paper-spec.md``):
LoRA r 8 / alpha 16 / dropout 0.05 on q, k, v, up, down projections; batch 16 (micro-batch
4); lr 3e-4, linear schedule, 100 warm-up steps; cutoff 256 tokens; 500 validation records;
eval/save every 200 steps, keep 3; seed 6; KD weight 1.0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from kdlab.config.core import FieldError, check, config_field, to_dict
from kdlab.config.methods import (
    DIVERGENCE_PARAMETERS,
    PAPER_METHOD_NAMES,
    TEACHER_CACHE_KINDS,
    MethodSpec,
    get_method,
    method_choices,
    unread_message,
    unread_settings,
)
from kdlab.losses.spec import KDLossSpec, LossSpecError

PAPER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]

#: The experiment trackers accelerate drives (``accelerate.tracking.LOGGER_TYPE_TO_CLASS``;
#: a test keeps the two in step). ``train.report_to`` names one or several, or ``all``
#: (every one installed), or ``none``.
TRACKERS = (
    "tensorboard",
    "wandb",
    "mlflow",
    "aim",
    "comet_ml",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
)
#: The record fields ``data.columns`` (and an eval task's ``columns``) can map a dataset's
#: own column names to (:mod:`kdlab.data.records` describes each format).
RECORD_COLUMNS = ("instruction", "input", "output", "answer", "messages", "prompt", "completion")


def check_columns(columns: Any, field_name: str = "columns") -> None:
    """``columns`` maps record fields (:data:`RECORD_COLUMNS`) to non-empty column names, or
    to null: the data's own column of that name is not read (e.g. a stray ``prompt``)."""
    for target, column in columns.items():
        check(
            target in RECORD_COLUMNS,
            f"{field_name}.{target}",
            f"is not a record field; fields: {', '.join(RECORD_COLUMNS)} "
            "(write columns: {FIELD: your_column})",
        )
        check(
            column is None or (isinstance(column, str) and bool(column.strip())),
            f"{field_name}.{target}",
            "must name a column of the data (a non-empty string), or be null (not read)",
        )


@dataclass
class ModelConfig:
    """Which causal LM to load and how."""

    name_or_path: str = config_field(
        "smollm2-135m",
        help="Hub id, local directory, .gguf file, or alias (smollm2-135m).",
    )
    revision: str | None = config_field(None, help="Hub revision (branch, tag or commit).")
    gguf_file: str | None = config_field(
        None, help="GGUF file name inside a hub repo or directory (when not given by the path)."
    )
    dtype: str = config_field(
        "auto",
        help="Weights dtype; auto = float32 on CPU, bfloat16 on CUDA.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = config_field(
        False, help="Run model code shipped with a hub repo. Off unless you set it."
    )
    allow_pickle: bool = config_field(
        False, help="Allow loading pickle (.bin/.pt) weights; safetensors only by default."
    )
    slice_layers: int | None = config_field(
        None, help="Keep only N decoder layers (a student made of a slice of the model)."
    )
    slice_strategy: str = config_field(
        "last",
        help="Which layers a slice keeps: last (the paper), first, evenly spaced, or ends "
        "(the first and last halves, dropping a middle block).",
        choices=("last", "first", "even", "ends"),
    )
    device: str = config_field("auto", help="auto, cpu, cuda, cuda:N.")
    attn_implementation: str | None = config_field(
        None, help="Attention kernel passed to transformers (eager, sdpa, flash_attention_2)."
    )
    quantization: str = config_field(
        "none",
        help="Load the weights quantized (a frozen teacher, an evaluated model, or a QLoRA "
        "base): 8bit = bitsandbytes LLM.int8 on CUDA, torchao int8 weight-only on CPU; "
        "4bit = bitsandbytes nf4/fp4 (docs/quantization.md).",
        choices=("none", "8bit", "4bit"),
    )
    quantization_4bit_type: str | None = config_field(
        None, help="4bit only: nf4 (default) or fp4.", choices=("nf4", "fp4")
    )
    quantization_4bit_compute_dtype: str | None = config_field(
        None,
        help="4bit only: dtype of the dequantised matmuls; auto (default) = the model dtype.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    quantization_4bit_double: bool | None = config_field(
        None, help="4bit only: also quantize the quantization constants (default false)."
    )

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "name_or_path", "must not be empty")
        check(
            self.slice_layers is None or self.slice_layers >= 1,
            "slice_layers",
            "must be a positive number of layers",
        )
        for name in (
            "quantization_4bit_type",
            "quantization_4bit_compute_dtype",
            "quantization_4bit_double",
        ):
            check(
                getattr(self, name) is None or self.quantization == "4bit",
                name,
                f"applies only to quantization: 4bit (here {self.quantization})",
            )


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (or full fine-tuning with ``method: full``)."""

    method: str = config_field(
        "lora",
        help="PEFT method: lora, dora (LoRA with weight decomposition), ia3, or any other "
        "peft PeftType name (options via `options`); full = train every weight.",
    )
    r: int = config_field(8, help="LoRA rank.")
    alpha: int = config_field(16, help="LoRA alpha (scale = alpha / r).")
    dropout: float = config_field(0.05, help="LoRA dropout.")
    target_modules: list[str] = config_field(
        default_factory=lambda: list(PAPER_LORA_TARGETS), help="Module names PEFT wraps."
    )
    bias: str = config_field("none", help="Train biases.", choices=("none", "all", "lora_only"))
    options: dict[str, Any] = config_field(
        default_factory=dict, help="Extra keyword arguments for the peft config class."
    )

    def __post_init__(self) -> None:
        self.method = self.method.lower()
        check(self.r >= 1, "r", "must be >= 1")
        check(self.alpha > 0, "alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(bool(self.target_modules), "target_modules", "must name at least one module")


@dataclass
class DataConfig:
    """Training data: sources, prompt template, tokenization."""

    train_files: list[Any] = config_field(
        default_factory=lambda: ["generated:arithmetic?split=train&n=2000&seed=0"],
        help="Sources: JSON/JSONL paths, hub dataset ids (hf:owner/name[:split]), "
        "'generated:arithmetic?...' or mappings {path, limit, weight}.",
    )
    template: str = config_field(
        "alpaca",
        help="Prompt template: alpaca (the paper's) or chat (tokenizer.apply_chat_template).",
        choices=("alpaca", "chat"),
    )
    cutoff_len: int = config_field(256, help="Truncate tokenized records to this many tokens.")
    train_on_inputs: bool = config_field(
        False, help="Also train on prompt tokens (the paper's scripts: true)."
    )
    add_eos: bool = config_field(True, help="Append the EOS token to each response.")
    val_set_size: int = config_field(500, help="Records held out for validation (0 = none).")
    max_records: int | None = config_field(None, help="Cap on training records after mixing.")
    seed: int = config_field(6, help="Seed for shuffling and the train/validation split.")
    columns: dict[str, str | None] = config_field(
        default_factory=dict,
        help="Your data's column names for kdlab's record fields, e.g. {instruction: "
        "question, output: answer}; fields: instruction, input, output, answer, messages, "
        "prompt, completion (docs/data-formats.md). Every record must have each named column; "
        "null = the data's own column of that name is not read.",
    )

    def __post_init__(self) -> None:
        check(bool(self.train_files), "train_files", "must list at least one source")
        check_columns(self.columns)
        check(self.cutoff_len >= 8, "cutoff_len", "must be >= 8")
        check(self.val_set_size >= 0, "val_set_size", "must be >= 0")
        check(self.max_records is None or self.max_records >= 1, "max_records", "must be >= 1")


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    output_dir: str = config_field("runs/finetune", help="Run directory.")
    num_epochs: float = config_field(4.0, help="Epochs (the paper: 4 math, 3 commonsense).")
    max_steps: int = config_field(-1, help="Stop after this many optimizer steps (-1 = epochs).")
    batch_size: int = config_field(16, help="Effective batch size (per optimizer step).")
    micro_batch_size: int = config_field(4, help="Batch per forward pass and process.")
    learning_rate: float = config_field(3e-4, help="Peak learning rate (AdamW).")
    weight_decay: float = config_field(0.0, help="AdamW weight decay.")
    warmup_steps: int = config_field(100, help="Linear warm-up steps.")
    lr_scheduler: str = config_field(
        "linear", help="Schedule after warm-up.", choices=("linear", "cosine", "constant")
    )
    max_grad_norm: float = config_field(1.0, help="Gradient clipping (0 = off).")
    eval_steps: int = config_field(200, help="Validate every N optimizer steps (0 = only at end).")
    save_steps: int = config_field(200, help="Checkpoint every N optimizer steps (0 = off).")
    save_total_limit: int = config_field(3, help="Keep at most N checkpoints (best is kept).")
    logging_steps: int = config_field(10, help="Log metrics every N optimizer steps.")
    best_metric: str = config_field(
        "val_loss",
        help="Validation metric choosing the best checkpoint.",
        choices=("val_loss", "val_ce", "val_kd"),
    )
    load_best_at_end: bool = config_field(
        True, help="Save the best checkpoint's weights as the final adapter/model."
    )
    report_to: str | list[str] = config_field(
        "none",
        help="Experiment tracker(s) accelerate logs every metrics.jsonl line to: none, all (every "
        f"installed one), or one or a list of {', '.join(TRACKERS)}.",
        choices=("none", "all", *TRACKERS),
    )
    tracker_project: str = config_field(
        "kdlab",
        help="Project name given to the trackers (wandb/trackio/comet project, mlflow "
        "experiment, tensorboard folder <output_dir>/trackers/<project>).",
    )
    seed: int = config_field(6, help="Seed for initialisation, dropout and data order.")
    gradient_checkpointing: bool = config_field(False, help="Trade compute for memory.")
    mixed_precision: str = config_field(
        "auto",
        help="auto (bf16 on CUDA, none on CPU), no, bf16, fp16.",
        choices=("auto", "no", "bf16", "fp16"),
    )
    max_skipped_fraction: float = config_field(
        1.0,
        help="Fail the run when more than this share of its micro-batches had no response "
        "token to learn from (1.0: fail only when every one had none).",
    )
    group_by_length: bool = config_field(
        True,
        help="Batches of records of similar length (shuffled, sorted inside mega-batches of "
        "50 batches, batch order shuffled again): little padding. false = plain shuffle.",
    )
    packing: bool = config_field(
        False,
        help="Pack each micro-batch into one row without padding (per-record positions, no "
        "attention across records); refused when the model's attention cannot isolate them.",
    )

    def __post_init__(self) -> None:
        check(self.num_epochs > 0, "num_epochs", "must be > 0")
        check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be -1 or >= 1")
        check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(
            self.batch_size % self.micro_batch_size == 0,
            "batch_size",
            f"must be a multiple of micro_batch_size ({self.micro_batch_size})",
        )
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        check(self.eval_steps >= 0, "eval_steps", "must be >= 0")
        check(self.save_steps >= 0, "save_steps", "must be >= 0")
        check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        check(self.logging_steps >= 1, "logging_steps", "must be >= 1")
        check(0.0 <= self.max_skipped_fraction <= 1.0, "max_skipped_fraction", "must be in [0, 1]")
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        check(
            len(names) == 1 or not {"none", "all"} & set(names),
            "report_to",
            "none and all stand alone; otherwise list tracker names",
        )
        check(bool(self.tracker_project.strip()), "tracker_project", "must not be empty")
        check(
            self.tracker_project == "kdlab" or bool(self.trackers),
            "tracker_project",
            "has no effect without a tracker (train.report_to is none)",
        )

    @property
    def trackers(self) -> tuple[str, ...]:
        """The tracker names of ``report_to`` (empty for none; ``("all",)`` for all)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return tuple(dict.fromkeys(name for name in names if name != "none"))


def _task_family_field() -> Any:
    """The ``task_family`` key of the training stages' configs (recorded in run.json)."""
    return config_field("math", help="Recorded in run.json (math, commonsense, ...).")


@dataclass
class FinetuneConfig:
    """``kdlab finetune``: supervised fine-tuning (teachers and the SFT-student baseline)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    role: str = config_field(
        "teacher", help="Recorded in run.json.", choices=("teacher", "student")
    )
    task_family: str = _task_family_field()


@dataclass
class TeacherConfig:
    """The frozen teacher of a distillation run."""

    model: ModelConfig | None = config_field(
        None, help="The teacher's base model (or a merged model). Required unless run_dir."
    )
    adapter: str | None = config_field(
        None,
        help="PEFT adapter directory (or a finetune run directory) on top of the model; "
        "'none' = the base model alone (the paper's task-unaware base teacher).",
    )
    run_dir: str | None = config_field(
        None, help="A finetune run directory: takes model and adapter from it."
    )


@dataclass
class GenerationConfig:
    """Sampling settings for on-policy (GKD) student generations and seqKD teacher outputs."""

    temperature: float = config_field(1.0, help="Sampling temperature (paper: 1.0).")
    top_k: int = config_field(0, help="Top-k (0 = off; paper: 0).")
    top_p: float = config_field(1.0, help="Nucleus sampling p (paper: 1.0).")
    max_new_tokens: int = config_field(128, help="Longest generated response.")
    do_sample: bool = config_field(True, help="Sample (true) or greedy (false).")

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")


@dataclass
class DistillSettings:
    """What the student learns from the teacher."""

    method: str = config_field(
        "forward_kl",
        help="sft, off-policy divergences, gkd (on-policy), seqkd (sequence-level). "
        "The paper's kd_loss names kld/reversekld/gkd/'' are accepted.",
        choices=method_choices(),
    )
    divergence: str | None = config_field(
        None,
        help="Token-level divergence (default: the method's own; jsd for gkd; none for seqkd).",
        choices=(*DIVERGENCE_PARAMETERS, "none"),
    )
    kd_weight: float = config_field(1.0, help="w in (1 - w)·CE + w·KD (paper: 1.0).")
    temperature: float = config_field(1.0, help="Softmax temperature of the divergence.")
    beta: float = config_field(0.5, help="JSD mixture weight β (GKD paper's definition).")
    skew: float = config_field(0.1, help="Skew α of skew KL divergences.")
    scale_by_t2: bool = config_field(True, help="Multiply the KD term by T² (paper's KL).")
    reduction: str = config_field(
        "token", help="Average over tokens or per-sequence.", choices=("token", "sequence")
    )
    loss_on: str = config_field(
        "response",
        help="Positions the loss covers (all = the paper's scripts).",
        choices=("response", "all"),
    )
    noise_std: float = config_field(0.0, help="Gaussian noise σ on teacher logits (ablation).")
    lambda_on_policy: float = config_field(
        0.5, help="GKD: probability that a batch uses student-generated responses."
    )
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    seqkd_greedy: bool = config_field(True, help="seqKD: teacher decodes greedily.")
    seqkd_batch_size: int = config_field(8, help="seqKD: teacher generation batch size.")
    seqkd_drop_truncated: bool = config_field(
        False,
        help="seqKD: drop records whose teacher response was cut by max_new_tokens (by "
        "default they are kept, without an EOS after them).",
    )
    chunk_size: int | None = config_field(
        None,
        help="Positions per chunk of the memory-efficient loss (None = auto: ~24 MiB fp32 "
        "per [rows, vocab] temporary on CPU, the loss's own default on GPUs).",
    )
    teacher_cache: str | None = config_field(
        None, help="Directory of a precomputed teacher-output cache (auto: one per fingerprint)."
    )
    teacher_cache_kind: str = config_field(
        "hidden",
        help="What the cache stores: hidden (the teacher's final hidden states + lm_head: "
        "exact for every divergence and temperature) or topk (top-k log-probs at T = 1: "
        "small, close for forward KL at T = 1 only, refused at T != 1).",
        choices=TEACHER_CACHE_KINDS,
    )
    teacher_cache_topk: int = config_field(64, help="k of a topk teacher-output cache.")

    def __post_init__(self) -> None:
        self.method = PAPER_METHOD_NAMES.get(self.method, self.method)
        check(0.0 <= self.kd_weight <= 1.0, "kd_weight", "must be in [0, 1]")
        check(self.noise_std >= 0, "noise_std", "must be >= 0")
        check(0.0 <= self.lambda_on_policy <= 1.0, "lambda_on_policy", "must be in [0, 1]")
        check(self.seqkd_batch_size >= 1, "seqkd_batch_size", "must be >= 1")
        check(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", "must be >= 1")
        check(self.teacher_cache_topk >= 1, "teacher_cache_topk", "must be >= 1")
        try:
            # Built once here, so the ranges of the loss settings are checked in one place
            # (the spec) and every loss path receives the same validated object.
            self._loss_spec = KDLossSpec(
                divergence=self.resolved_divergence or "forward_kl",
                temperature=self.temperature,
                beta=self.beta,
                skew=self.skew,
                reduction=self.reduction,
                scale_by_t2=self.scale_by_t2,
            )
        except LossSpecError as error:
            raise FieldError(error.field, error.message) from None
        for key, value in unread_settings(self):
            raise FieldError(key, unread_message(self, key), value=value)

    @property
    def spec(self) -> MethodSpec:
        """The method table's entry for ``method``."""
        return get_method(self.method)

    @property
    def resolved_divergence(self) -> str | None:
        """The divergence actually used (None = no KD term)."""
        return self.spec.divergence(self)

    @property
    def loss_spec(self) -> KDLossSpec | None:
        """The KD term's settings, validated; None when the run has no KD term."""
        return self._loss_spec if self.resolved_divergence is not None else None


@dataclass
class DistillConfig:
    """``kdlab distill``: a student trained against a frozen teacher."""

    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill"))
    distill: DistillSettings = field(default_factory=DistillSettings)
    task_family: str = _task_family_field()

    def __post_init__(self) -> None:
        loss_spec = self.distill.loss_spec
        if self.train.packing and loss_spec is not None and loss_spec.reduction == "sequence":
            raise FieldError(
                "train.packing",
                "cannot be combined with distill.reduction = sequence (the per-sequence mean "
                "weighs rows, and a packed row holds several records); use reduction token",
                value=True,
            )
        if self.train.packing and self.distill.spec.cross_tokenizer(self.distill):
            raise FieldError(
                "train.packing",
                f"cannot be combined with the cross-tokenizer divergence "
                f"{self.distill.resolved_divergence} (its batches pair two tokenizations row by "
                "row); turn packing off",
                value=True,
            )
        if self.distill.spec.needs_teacher:
            return
        defaults = TeacherConfig()
        for item in fields(TeacherConfig):
            value = getattr(self.teacher, item.name)
            if value != getattr(defaults, item.name):
                raise FieldError(
                    f"teacher.{item.name}",
                    f"distill.method = {self.distill.method} has no teacher; remove it",
                    value=value if not dataclasses.is_dataclass(value) else to_dict(value),
                )
