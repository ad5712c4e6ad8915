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
#: the origin of a name both of them use
HF_TORCHTUNE = f"{HF}/{TORCHTUNE}"
TORCHTUNE_PAPER = f"{TORCHTUNE}/{PAPER}"


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


#: Foreign names with exactly the kdlab meaning: (name, sections, origin, target), by section.
_SAME_MEANING: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("per_device_train_batch_size", _TRAIN, HF, "micro_batch_size"),
    ("num_train_epochs", _TRAIN, HF, "num_epochs"),
    ("epochs", _TRAIN, TORCHTUNE, "num_epochs"),
    ("lr", _TRAIN, TORCHTUNE, "learning_rate"),
    ("num_warmup_steps", _TRAIN, TORCHTUNE, "warmup_steps"),
    ("log_every_n_steps", _TRAIN, TORCHTUNE, "logging_steps"),
    ("enable_activation_checkpointing", _TRAIN, TORCHTUNE, "gradient_checkpointing"),
    ("load_best_model_at_end", _TRAIN, HF, "load_best_at_end"),
    ("metric_for_best_model", _TRAIN, HF, "best_metric"),
    ("max_length", _DATA, TRL, "cutoff_len"),
    ("max_seq_length", _DATA, TRL, "cutoff_len"),
    ("max_seq_len", _DATA, TORCHTUNE, "cutoff_len"),
    ("train_on_input", _DATA, TORCHTUNE, "train_on_inputs"),
    ("lora_r", _PEFT, PEFT, "r"),
    ("lora_rank", _PEFT, TORCHTUNE, "r"),
    ("lora_alpha", _PEFT, PEFT, "alpha"),
    ("lora_dropout", _PEFT, PEFT, "dropout"),
    ("lora_target_modules", _PEFT, PEFT, "target_modules"),
    ("model_name_or_path", _MODEL, TRL, "name_or_path"),
    ("torch_dtype", _MODEL, HF, "dtype"),
    ("model_revision", _MODEL, TRL, "revision"),
    ("lmbda", _DISTILL, TRL, "lambda_on_policy"),
    ("kd_ratio", _DISTILL, TORCHTUNE, "kd_weight"),
    ("kd_loss_weight", _DISTILL, PAPER, "kd_weight"),
    ("kd_temperature", _DISTILL, PAPER, "temperature"),
    ("per_device_eval_batch_size", ("EvalConfig",), HF, "batch_size"),
)  # fmt: skip

#: Foreign names without it: (name, sections, origin, suggest, note), by section; the flags last.
_SUGGESTIONS: tuple[tuple[str, tuple[str, ...], str, str, str], ...] = (
    ("gradient_accumulation_steps", _TRAIN, HF_TORCHTUNE, "{prefix}batch_size",
     "kdlab has no accumulation count: {prefix}batch_size is the effective batch per optimizer step, {prefix}micro_batch_size the batch per forward pass and process; accumulation steps = batch_size / (micro_batch_size × processes)"),
    ("per_device_eval_batch_size", _TRAIN, HF, "{prefix}micro_batch_size",
     "validation batches have {prefix}micro_batch_size records too"),
    ("bf16", _TRAIN, HF, "{prefix}mixed_precision",
     "write {prefix}mixed_precision=bf16"),
    ("fp16", _TRAIN, HF, "{prefix}mixed_precision",
     "write {prefix}mixed_precision=fp16"),
    ("warmup_ratio", _TRAIN, HF, "{prefix}warmup_steps",
     "kdlab counts warm-up in optimizer steps"),
    ("lr_scheduler_type", _TRAIN, HF, "{prefix}lr_scheduler",
     "linear, cosine or constant: the schedule after {prefix}warmup_steps"),
    ("eval_strategy", _TRAIN, HF, "{prefix}eval_steps",
     "kdlab validates every {prefix}eval_steps optimizer steps (0 = at the end)"),
    ("evaluation_strategy", _TRAIN, HF, "{prefix}eval_steps",
     "kdlab validates every {prefix}eval_steps optimizer steps (0 = at the end)"),
    ("save_strategy", _TRAIN, HF, "{prefix}save_steps",
     "kdlab saves every {prefix}save_steps optimizer steps (0 = off)"),
    ("optim", _TRAIN, HF, "{prefix}learning_rate",
     "kdlab trains with AdamW ({prefix}learning_rate, {prefix}weight_decay)"),
    ("resume_from_checkpoint", (*_TRAIN, "FinetuneConfig", "DistillConfig"), HF_TORCHTUNE, "--resume",
     "a command-line flag: it continues from the last checkpoint in train.output_dir"),
    ("max_length", _TRAIN, TRL, "{parent}data.cutoff_len",
     "the token cutoff of training records"),
    ("max_seq_length", _TRAIN, TRL, "{parent}data.cutoff_len",
     "the token cutoff of training records"),
    ("completion_only_loss", _DATA, TRL, "{prefix}train_on_inputs",
     "the loss covers the response only unless {prefix}train_on_inputs=true"),
    ("data_path", _DATA, PAPER, "{prefix}train_files",
     "a list of sources: {prefix}train_files=[PATH]"),
    ("dataset", _DATA, TORCHTUNE, "{prefix}train_files",
     "a list of sources (paths, hf:owner/name[:split], generated:...)"),
    ("dataset_name", _DATA, TRL, "{prefix}train_files",
     "a list of sources: {prefix}train_files=[hf:owner/name]"),
    ("lora_attn_modules", _PEFT, TORCHTUNE, "{prefix}target_modules",
     "Hugging Face module names, e.g. [q_proj, k_proj, v_proj, o_proj, up_proj]"),
    ("use_peft", _PEFT, TRL, "{prefix}method",
     "lora (the default), dora, ia3, ... or full"),
    ("use_dora", _PEFT, TRL, "{prefix}method",
     "write {prefix}method=dora"),
    ("use_rslora", _PEFT, TRL, "{prefix}options",
     "write {prefix}options={{use_rslora: true}}"),
    ("teacher_model_name_or_path", ("DistillConfig",), TRL, "{prefix}teacher.model.name_or_path",
     "or teacher.run_dir: a kdlab finetune run brings model and adapter"),
    ("teacher_model_name_or_path", _DISTILL, TRL, "{parent}teacher.model.name_or_path",
     "or teacher.run_dir: a kdlab finetune run brings model and adapter"),
    ("kd_loss", _DISTILL, TORCHTUNE_PAPER, "{prefix}method",
     "sft, forward_kl, reverse_kl, jsd, skew_*, tvd, gkd or seqkd (the paper's kld/reversekld/gkd are accepted); {prefix}divergence overrides the divergence"),
    ("seq_kd", _DISTILL, TRL, "{prefix}method",
     "write {prefix}method=seqkd"),
    ("max_completion_length", _DISTILL, TRL, "{prefix}generation.max_new_tokens",
     "the longest on-policy (GKD) or seqKD generation"),
    ("pretrained", ("EvalConfig",), "lm-evaluation-harness", "{prefix}model",
     "a hub id, path or alias; or run_dir"),
    ("resume", ("*",), "kdlab", "--resume",
     "it is a command-line flag, not a config key"),
    ("overwrite", ("*",), "kdlab", "--overwrite",
     "it is a command-line flag, not a config key"),
)  # fmt: skip

FOREIGN_KEYS: tuple[ForeignKey, ...] = (
    *(
        ForeignKey(name, sections, origin, target=target)
        for name, sections, origin, target in _SAME_MEANING
    ),
    *(
        ForeignKey(name, sections, origin, suggest=suggest, note=note)
        for name, sections, origin, suggest, note in _SUGGESTIONS
    ),
)

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
