"""Config key names people bring from Hugging Face Trainer, TRL, PEFT and torchtune.

One table, read by the loader's unknown-key path (:func:`kdlab.config.core.from_mapping`):

- an entry with a ``target`` has exactly the kdlab meaning: it is read as that key of the
  same section, with a logged note (``train.num_train_epochs`` → ``train.num_epochs``);
- an entry with a ``suggest`` does not (another type, another unit, or no such knob): the
  config is refused with "did you mean" naming the kdlab key and a note saying how to
  express it (``train.gradient_accumulation_steps`` → ``train.batch_size``).

``sections`` names the config classes (by class name; ``*`` = any) where the name is
recognised. A name found in a *nested* section of the class being read (``lora_r`` at the
top of a finetune config) is never mapped across sections: it becomes a suggestion
(``peft.r``). In ``suggest`` and ``note``, ``{prefix}`` is the section's dotted prefix
(``train.``) and ``{parent}`` that of the config holding the section (usually empty).
"""

from __future__ import annotations

from dataclasses import dataclass

#: the kdlab sections of the training stages (finetune's model, distill's student/teacher)
_TRAIN = ("TrainConfig",)
_MODEL = ("ModelConfig",)
_PEFT = ("PeftConfig",)
_DATA = ("DataConfig",)
_DISTILL = ("DistillSettings",)

HF = "Hugging Face Trainer"
TRL = "TRL"
PEFT = "PEFT/TRL"
TORCHTUNE = "torchtune"
PAPER = "the paper's scripts"


@dataclass(frozen=True)
class ForeignKey:
    """A foreign spelling of a config key (see the module docstring)."""

    name: str
    sections: tuple[str, ...]
    origin: str
    target: str | None = None
    suggest: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if (self.target is None) == (self.suggest is None):
            raise ValueError(f"foreign key {self.name}: give exactly one of target and suggest")


FOREIGN_KEYS: tuple[ForeignKey, ...] = (
    # ------------------------------------------------------------------ train: same meaning
    ForeignKey("per_device_train_batch_size", _TRAIN, HF, target="micro_batch_size"),
    ForeignKey("num_train_epochs", _TRAIN, HF, target="num_epochs"),
    ForeignKey("epochs", _TRAIN, TORCHTUNE, target="num_epochs"),
    ForeignKey("lr", _TRAIN, TORCHTUNE, target="learning_rate"),
    ForeignKey("num_warmup_steps", _TRAIN, TORCHTUNE, target="warmup_steps"),
    ForeignKey("log_every_n_steps", _TRAIN, TORCHTUNE, target="logging_steps"),
    ForeignKey("enable_activation_checkpointing", _TRAIN, TORCHTUNE,
               target="gradient_checkpointing"),
    ForeignKey("load_best_model_at_end", _TRAIN, HF, target="load_best_at_end"),
    ForeignKey("metric_for_best_model", _TRAIN, HF, target="best_metric"),
    # ------------------------------------------------------------------ train: suggestions
    ForeignKey("gradient_accumulation_steps", _TRAIN, f"{HF}/{TORCHTUNE}",
               suggest="{prefix}batch_size",
               note="kdlab has no accumulation count: {prefix}batch_size is the effective batch "
               "per optimizer step, {prefix}micro_batch_size the batch per forward pass and "
               "process; accumulation steps = batch_size / (micro_batch_size × processes)"),
    ForeignKey("per_device_eval_batch_size", _TRAIN, HF, suggest="{prefix}micro_batch_size",
               note="validation batches have {prefix}micro_batch_size records too"),
    ForeignKey("bf16", _TRAIN, HF, suggest="{prefix}mixed_precision",
               note="write {prefix}mixed_precision=bf16"),
    ForeignKey("fp16", _TRAIN, HF, suggest="{prefix}mixed_precision",
               note="write {prefix}mixed_precision=fp16"),
    ForeignKey("warmup_ratio", _TRAIN, HF, suggest="{prefix}warmup_steps",
               note="kdlab counts warm-up in optimizer steps"),
    ForeignKey("lr_scheduler_type", _TRAIN, HF, suggest="{prefix}lr_scheduler",
               note="linear, cosine or constant: the schedule after {prefix}warmup_steps"),
    ForeignKey("eval_strategy", _TRAIN, HF, suggest="{prefix}eval_steps",
               note="kdlab validates every {prefix}eval_steps optimizer steps (0 = at the end)"),
    ForeignKey("evaluation_strategy", _TRAIN, HF, suggest="{prefix}eval_steps",
               note="kdlab validates every {prefix}eval_steps optimizer steps (0 = at the end)"),
    ForeignKey("save_strategy", _TRAIN, HF, suggest="{prefix}save_steps",
               note="kdlab saves every {prefix}save_steps optimizer steps (0 = off)"),
    ForeignKey("optim", _TRAIN, HF, suggest="{prefix}learning_rate",
               note="kdlab trains with AdamW ({prefix}learning_rate, {prefix}weight_decay)"),
    ForeignKey("resume_from_checkpoint", (*_TRAIN, "FinetuneConfig", "DistillConfig"),
               f"{HF}/{TORCHTUNE}", suggest="--resume",
               note="a command-line flag: it continues from the last checkpoint in "
               "train.output_dir"),
    ForeignKey("max_length", _TRAIN, TRL, suggest="{parent}data.cutoff_len",
               note="the token cutoff of training records"),
    ForeignKey("max_seq_length", _TRAIN, TRL, suggest="{parent}data.cutoff_len",
               note="the token cutoff of training records"),
    # ------------------------------------------------------------------ data
    ForeignKey("max_length", _DATA, TRL, target="cutoff_len"),
    ForeignKey("max_seq_length", _DATA, TRL, target="cutoff_len"),
    ForeignKey("max_seq_len", _DATA, TORCHTUNE, target="cutoff_len"),
    ForeignKey("train_on_input", _DATA, TORCHTUNE, target="train_on_inputs"),
    ForeignKey("completion_only_loss", _DATA, TRL, suggest="{prefix}train_on_inputs",
               note="the loss covers the response only unless {prefix}train_on_inputs=true"),
    ForeignKey("data_path", _DATA, PAPER, suggest="{prefix}train_files",
               note="a list of sources: {prefix}train_files=[PATH]"),
    ForeignKey("dataset", _DATA, TORCHTUNE, suggest="{prefix}train_files",
               note="a list of sources (paths, hf:owner/name[:split], generated:...)"),
    ForeignKey("dataset_name", _DATA, TRL, suggest="{prefix}train_files",
               note="a list of sources: {prefix}train_files=[hf:owner/name]"),
    # ------------------------------------------------------------------ peft
    ForeignKey("lora_r", _PEFT, PEFT, target="r"),
    ForeignKey("lora_rank", _PEFT, TORCHTUNE, target="r"),
    ForeignKey("lora_alpha", _PEFT, PEFT, target="alpha"),
    ForeignKey("lora_dropout", _PEFT, PEFT, target="dropout"),
    ForeignKey("lora_target_modules", _PEFT, PEFT, target="target_modules"),
    ForeignKey("lora_attn_modules", _PEFT, TORCHTUNE, suggest="{prefix}target_modules",
               note="Hugging Face module names, e.g. [q_proj, k_proj, v_proj, o_proj, up_proj]"),
    ForeignKey("use_peft", _PEFT, TRL, suggest="{prefix}method",
               note="lora (the default), dora, ia3, ... or full"),
    ForeignKey("use_dora", _PEFT, TRL, suggest="{prefix}method",
               note="write {prefix}method=dora"),
    ForeignKey("use_rslora", _PEFT, TRL, suggest="{prefix}options",
               note="write {prefix}options={{use_rslora: true}}"),
    # ------------------------------------------------------------------ models
    ForeignKey("model_name_or_path", _MODEL, TRL, target="name_or_path"),
    ForeignKey("torch_dtype", _MODEL, HF, target="dtype"),
    ForeignKey("model_revision", _MODEL, TRL, target="revision"),
    ForeignKey("teacher_model_name_or_path", ("DistillConfig",), TRL,
               suggest="{prefix}teacher.model.name_or_path",
               note="or teacher.run_dir: a kdlab finetune run brings model and adapter"),
    ForeignKey("teacher_model_name_or_path", _DISTILL, TRL,
               suggest="{parent}teacher.model.name_or_path",
               note="or teacher.run_dir: a kdlab finetune run brings model and adapter"),
    # ------------------------------------------------------------------ distillation
    ForeignKey("lmbda", _DISTILL, TRL, target="lambda_on_policy"),
    ForeignKey("kd_ratio", _DISTILL, TORCHTUNE, target="kd_weight"),
    ForeignKey("kd_loss_weight", _DISTILL, PAPER, target="kd_weight"),
    ForeignKey("kd_temperature", _DISTILL, PAPER, target="temperature"),
    ForeignKey("kd_loss", _DISTILL, f"{TORCHTUNE}/{PAPER}", suggest="{prefix}method",
               note="sft, forward_kl, reverse_kl, jsd, skew_*, tvd, gkd or seqkd (the paper's "
               "kld/reversekld/gkd are accepted); {prefix}divergence overrides the divergence"),
    ForeignKey("seq_kd", _DISTILL, TRL, suggest="{prefix}method",
               note="write {prefix}method=seqkd"),
    ForeignKey("max_completion_length", _DISTILL, TRL,
               suggest="{prefix}generation.max_new_tokens",
               note="the longest on-policy (GKD) or seqKD generation"),
    # ------------------------------------------------------------------ evaluation
    ForeignKey("per_device_eval_batch_size", ("EvalConfig",), HF, target="batch_size"),
    ForeignKey("pretrained", ("EvalConfig",), "lm-evaluation-harness",
               suggest="{prefix}model", note="a hub id, path or alias; or run_dir"),
    # ------------------------------------------------------------------ flags, not keys
    ForeignKey("resume", ("*",), "kdlab", suggest="--resume",
               note="it is a command-line flag, not a config key"),
    ForeignKey("overwrite", ("*",), "kdlab", suggest="--overwrite",
               note="it is a command-line flag, not a config key"),
)  # fmt: skip

_BY_SECTION: dict[tuple[str, str], ForeignKey] = {}
for _entry in FOREIGN_KEYS:
    for _section in _entry.sections:
        if (_section, _entry.name) in _BY_SECTION:
            raise ValueError(f"foreign key {_entry.name} listed twice for {_section}")
        _BY_SECTION[(_section, _entry.name)] = _entry


def foreign_key(section: str, name: str) -> ForeignKey | None:
    """The entry for ``name`` read in config class ``section`` (or in any class), or None."""
    return _BY_SECTION.get((section, name)) or _BY_SECTION.get(("*", name))


def render(text: str, prefix: str) -> str:
    """``text`` with ``{prefix}`` (``train.``) and ``{parent}`` (its parent's) filled in."""
    parent = prefix.rstrip(".").rpartition(".")[0]
    return text.format(prefix=prefix, parent=f"{parent}." if parent else "")


__all__ = ["FOREIGN_KEYS", "ForeignKey", "foreign_key", "render"]
