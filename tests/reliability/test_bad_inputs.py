"""Bad inputs are refused: exit code 2, one line on stderr naming what is wrong, no
traceback, and no change to existing outputs.

The cases are a table: one :class:`Case` per line. ``argv`` may use these placeholders:

============  ================================================================
``<bad>``     the corpus folder ``tests/reliability/bad_inputs/``
``<tiny>``    the hidden-16 tiny model; ``<teacher>`` the hidden-32 one
``<out>``     a folder of existing outputs (snapshotted before, compared after):
              ``<out>/run`` a finished training run, ``<out>/eval`` a finished
              evaluation, ``<out>/dotted`` one with the user's ``.env`` and ``.git``,
              ``<out>/link`` a symbolic link to ``<out>/run``, ``<out>/notes.txt`` a
              user file; ``<out>/new`` is free
``<models>``  odd model folders: ``pickle_only``, ``no_config``, ``other_tokenizer``,
              ``weights.bin`` (a file), ``truncated_weights`` (model.safetensors cut in
              half), ``narrow_teacher`` (the tiny tokenizer, an lm_head 8 rows short),
              ``truncated_adapter`` (``<adapter>`` with its weights cut to 100 bytes)
``<adapter>`` a LoRA adapter made for the hidden-32 model
``<evaldata>`` eval data in the LLM-Adapters layout (gsm8k, boolq)
============  ================================================================

Adding a case is adding a line to :data:`CASES`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdlab.cli import main as cli_main
from kdlab.utils.locking import LOCK_FILE
from kdlab_testing import build_tiny_model

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
PROGRESS = re.compile(r"\d+%\|.*\|")
TRAIN = "generated:arithmetic?split=train&n=8&seed=0"
#: finetune/distill arguments that would make a valid, tiny run (cases spoil one thing).
FT = ("finetune", "model.name_or_path=<tiny>", f"data.train_files=['{TRAIN}']",
      "data.val_set_size=2", "train.max_steps=1", "train.batch_size=2",
      "train.micro_batch_size=2", "train.output_dir=<out>/new")  # fmt: skip
DI = ("distill", "student.name_or_path=<tiny>", "teacher.model.name_or_path=<teacher>",
      f"data.train_files=['{TRAIN}']", "data.val_set_size=2", "train.max_steps=1",
      "train.batch_size=2", "train.micro_batch_size=2", "train.output_dir=<out>/new")  # fmt: skip
EV = ("eval", "model.name_or_path=<tiny>", "data_dir=<evaldata>", "tasks=[gsm8k]", "limit=2",
      "backend=hf", "generation.max_new_tokens=4", "output_dir=<out>/new")  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One bad input: the command line, and what its one-line error must mention."""

    id: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]
    subprocess: bool = False
    """Also run it as a real ``python -m kdlab`` process (slow: ~10 s of imports)."""


def case(id: str, argv: tuple[str, ...], *needles: str, subprocess: bool = False) -> Case:
    """A :class:`Case` (flags may sit anywhere among the overrides)."""
    return Case(id, argv, needles, subprocess)


def with_file(base: tuple[str, ...], file: str, *keys: str) -> tuple[str, ...]:
    """``base`` with a config file, dropping the overrides of ``keys`` (which would win)."""
    kept = tuple(a for a in base[1:] if not a.split("=", 1)[0].startswith(keys))
    return (base[0], f"<bad>/{file}", *kept)


CASES: list[Case] = [
    # ---------------------------------------------------------------- config files
    case("yaml-invalid", with_file(FT, "invalid_yaml.yaml"), "invalid_yaml.yaml",
         "invalid YAML", "line", subprocess=True),
    case("yaml-not-mapping", with_file(FT, "list_config.yaml"), "list_config.yaml",
         "mapping"),
    case("yaml-binary", with_file(FT, "binary_config.yaml"), "binary_config.yaml",
         "not a text file"),
    case("yaml-missing", ("finetune", "<bad>/no_such.yaml"), "no_such.yaml", "not found"),
    case("yaml-is-directory", ("finetune", "<bad>"), "bad_inputs", "directory"),
    case("yaml-unknown-key", with_file(FT, "unknown_key.yaml"), "unknown_key.yaml",
         "'trian'", "did you mean 'train'"),
    case("yaml-wrong-type", with_file(FT, "wrong_type.yaml", "train.max_steps"), "wrong_type.yaml",
         "train.max_steps", "'ten'"),
    case("yaml-list-expected", with_file(FT, "target_modules_not_list.yaml"),
         "peft.target_modules", "list"),
    case("yaml-section-not-mapping", with_file(FT, "section_not_mapping.yaml", "train."),
         "section_not_mapping.yaml", "train", "mapping"),
    case("yaml-beta-1.5", with_file(DI, "beta_out_of_range.yaml"),
         "distill.beta", "1.5"),
    case("yaml-epochs-infinite", with_file(FT, "infinite_epochs.yaml", "train.max_steps"),
         "train.num_epochs", "inf"),
    case("yaml-duplicate-section", with_file(FT, "duplicate_section.yaml", "train."),
         "duplicate_section.yaml", "'train' is given twice", "lines 2 and 7"),
    case("yaml-alias-bomb", with_file(FT, "alias_bomb.yaml"), "alias_bomb.yaml", "aliases",
         subprocess=True),
    case("yaml-alias-cycle", with_file(FT, "alias_cycle.yaml"), "alias_cycle.yaml",
         "refers to a mapping or list that contains it"),
    case("paper-args-invalid-json", (*FT, "--from-paper-args", "<bad>/paper_args_invalid.json"),
         "paper_args_invalid.json", "JSON"),
    case("paper-args-not-object", ("eval", "--from-paper-args", "<bad>/paper_args_list.json"),
         "paper_args_list.json", "object"),
    # ---------------------------------------------------------------- overrides
    case("lr-negative", (*FT, "train.learning_rate=-1e-4"), "train.learning_rate", "-1e-4"),
    case("lr-zero", (*FT, "train.learning_rate=0"), "train.learning_rate", "0"),
    case("lr-nan", (*FT, "train.learning_rate=.nan"), "train.learning_rate", "nan"),
    case("temperature-0", (*DI, "distill.temperature=0"), "distill.temperature", "0"),
    case("kd-weight-1.5", (*DI, "distill.kd_weight=1.5"), "distill.kd_weight", "1.5"),
    case("method-unknown", (*DI, "distill.method=magic"), "distill.method", "magic"),
    case("peft-method-unknown", (*FT, "peft.method=notapeft"), "peft.method", "notapeft"),
    case("peft-dropout-1", (*FT, "peft.dropout=1.0"), "peft.dropout", "1.0"),
    case("peft-rank-0", (*FT, "peft.r=0"), "peft.r", "0"),
    case("peft-options-unknown", (*FT, "peft.options={foo: 1}"), "peft.options", "'foo'"),
    case("peft-options-unknown-distill", (*DI, "peft.options={foo: 1}"), "peft.options", "'foo'"),
    case("override-duplicate-key", (*FT, "peft.options={a: 1, a: 2}"), "'peft.options'",
         "'a' is given twice"),
    case("val-set-size-larger-than-data", (*FT, "data.val_set_size=8"), "data.val_set_size = 8",
         "8 training records"),
    case("batch-not-multiple", (*FT, "train.batch_size=3"), "train.batch_size", "3"),
    case("cutoff-too-short", (*FT, "data.cutoff_len=4"), "data.cutoff_len", "4"),
    case("max-steps-0", (*FT, "train.max_steps=0"), "train.max_steps", "0"),
    case("dtype-choice", (*FT, "model.dtype=float8"), "model.dtype", "float8"),
    case("output-dir-list", (*FT, "train.output_dir=[a, b]"), "train.output_dir"),
    case("override-empty-key", ("finetune", "=3"), "'=3'", "empty key"),
    case("override-empty-part", ("finetune", "train..max_steps=3"), "train..max_steps=3"),
    case("unknown-flag", ("finetune", "--frobnicate"), "--frobnicate"),
    case("unknown-flag-names-subcommand", ("eval", "--frobnicate"), "kdlab eval: error",
         "--frobnicate", "kdlab eval --help", subprocess=True),
    case("unknown-command", ("frobnicate",), "frobnicate"),
    case("dotted-flag-without-value", ("finetune", "--train.max_steps"), "kdlab finetune: error",
         "--train.max_steps needs a value"),
    case("dotted-flag-unknown-key", (*FT, "--train.gradient_accumulation_steps", "4"),
         "'train.gradient_accumulation_steps'", "did you mean 'train.batch_size'"),
    case("foreign-flag-misplaced", (*FT, "--per_device_train_batch_size", "4"),
         "'per_device_train_batch_size'", "did you mean 'train.micro_batch_size'"),
    case("distill-kd-ratio-twice", (*DI, "distill.kd_ratio=0.5", "distill.kd_weight=0.5"),
         "'distill.kd_ratio'", "'distill.kd_weight'", "keep one"),
    case("config-file-twice", ("finetune", "--config", "<bad>/unknown_key.yaml",
         "<bad>/list_config.yaml"), "list_config.yaml", "already given with --config"),
    case("config-option-unknown-key", ("finetune", "--config", "<bad>/unknown_key.yaml"),
         "unknown_key.yaml", "did you mean 'train'"),
    case("eval-resume-as-key", (*EV, "resume=true"), "unknown key 'resume'",
         "did you mean '--resume'"),
    case("sweep-overwrite", ("sweep", "students=[x]", "methods=[sft]", "--overwrite"), "kdlab sweep: error",
         "never deletes runs"),
    # ---------------------------------------------------------------- models
    case("model-missing", (*FT, "model.name_or_path=/nonexistent/model"), "/nonexistent/model",
         "no such file", subprocess=True),
    case("model-no-config", (*FT, "model.name_or_path=<models>/no_config"), "no_config",
         "config.json"),
    case("model-is-file", (*FT, "model.name_or_path=<models>/weights.bin"), "weights.bin",
         "not a directory"),
    case("model-gguf-missing", (*FT, "model.name_or_path=<models>/absent.gguf"), "absent.gguf",
         "not found"),
    case("model-pickle-only", (*FT, "model.name_or_path=<models>/pickle_only"), "pickle_only",
         "allow_pickle"),
    case("adapter-other-base", (*EV, "adapter=<adapter>"), "<adapter>", "adapter",
         subprocess=True),
    case("adapter-not-peft", (*EV, "adapter=<models>/no_config"), "no_config", "adapter_config"),
    case("tokenizer-mismatch", (*DI[:2], "teacher.model.name_or_path=<models>/other_tokenizer",
         *DI[3:]), "tokenizers differ"),
    case("teacher-adapter-missing", (*DI, "teacher.adapter=/nonexistent/adapter"),
         "teacher.adapter", "/nonexistent/adapter"),
    case("teacher-missing", (*DI[:2], *DI[3:], "distill.method=gkd"), "needs a teacher"),
    case("teacher-run-missing", (*DI[:2], *DI[3:], "teacher.run_dir=/nonexistent/run"),
         "/nonexistent/run"),
    # ---------------------------------------------------------------- training data
    case("data-invalid-json", (*FT, "data.train_files=[<bad>/invalid.json]"), "invalid.json",
         "invalid JSON"),
    case("data-empty", (*FT, "data.train_files=[<bad>/empty.json]"), "empty.json", "empty"),
    case("data-blank-jsonl", (*FT, "data.train_files=[<bad>/blank.jsonl]"), "blank.jsonl",
         "empty"),
    case("data-binary", (*FT, "data.train_files=[<bad>/binary.json]"), "binary.json",
         "not a text file", subprocess=True),
    case("data-top-level-object", (*FT, "data.train_files=[<bad>/top_level_object.json]"),
         "top_level_object.json", "list"),
    case("data-empty-list", (*FT, "data.train_files=[<bad>/empty_list.json]"), "empty_list.json",
         "no records"),
    case("data-missing-field", (*FT, "data.train_files=[<bad>/missing_output.json]"),
         "missing_output.json", "record 0", "'output'"),
    case("data-wrong-type", (*FT, "data.train_files=[<bad>/instruction_number.json]"),
         "instruction_number.json", "'instruction'", "string"),
    case("data-null-field", (*FT, "data.train_files=[<bad>/instruction_null.json]"),
         "instruction_null.json", "'instruction'", "null"),
    case("data-bad-jsonl-line", (*FT, "data.train_files=[<bad>/bad_line.jsonl]"), "bad_line.jsonl",
         "line 2"),
    case("data-csv", (*FT, "data.train_files=[<bad>/records.csv]"), "records.csv", ".csv"),
    case("data-missing", (*FT, "data.train_files=[<bad>/absent.json]"), "absent.json", "not found"),
    case("data-nested-lists", (*FT, "data.train_files=[<bad>/deeply_nested.json]"),
         "deeply_nested.json", "record 0"),
    case("data-mixture-weight", (*FT, "data.train_files=[{path: <bad>/x.json, weight: -1}]"),
         "'weight'", "-1"),
    case("data-generator-unknown", (*FT, "data.train_files=['generated:geometry?n=3']"),
         "geometry"),
    case("data-lone-surrogate", (*FT, "data.train_files=[<bad>/surrogate.json]"),
         "surrogate.json", "record 1", "'instruction'", "unpaired surrogate", subprocess=True),
    case("data-lone-surrogate-distill", (*DI, "data.train_files=[<bad>/surrogate.json]"),
         "surrogate.json", "record 1", "unpaired surrogate"),
    case("data-duplicate-key", (*FT, "data.train_files=[<bad>/duplicate_key.json]"),
         "duplicate_key.json", "record 0", "'output' is given twice"),
    case("data-validate-binary", ("data", "validate", "<bad>/binary.json"), "binary.json", "NUL"),
    # ---------------------------------------------------------------- evaluation
    case("eval-limit--1", with_file(EV, "eval_limit_negative.yaml", "limit"), "'limit'", "-1"),
    case("eval-limit-0", (*EV, "limit=0"), "'limit'", "0"),
    case("eval-batch-0", (*EV, "batch_size=0"), "batch_size", "0"),
    case("eval-top-p-0", (*EV, "generation.top_p=0"), "generation.top_p", "0"),
    case("eval-preset-unknown", (*EV, "generation=beam"), "generation", "beam"),
    case("eval-unknown-task", with_file(EV, "eval_unknown_task.yaml", "tasks"), "gsm9k",
         "did you mean 'gsm8k'", subprocess=True),
    case("eval-task-path", (*EV, "tasks=[../../x]"), "'../../x'"),
    case("eval-custom-task-path", with_file(EV, "eval_custom_task_path.yaml", "tasks"),
         "tasks[0].name", "../escape"),
    case("eval-custom-task-collides",
         (*EV, "tasks=[{name: config.yaml, path: <evaldata>/gsm8k/test.json, type: numeric}]"),
         "config.yaml"),
    case("eval-custom-task-nul",
         (*EV, 'tasks=[{name: "a\\0b", path: <evaldata>/gsm8k/test.json, type: numeric}]'),
         "tasks[0].name"),
    case("eval-custom-task-dotdot",
         (*EV, "tasks=[{name: .., path: <evaldata>/gsm8k/test.json, type: numeric}]"),
         "tasks[0].name"),
    case("eval-task-type-unknown", (*EV, "tasks=[{name: t, path: <bad>/x.json, type: essay}]"),
         "essay"),
    case("eval-data-missing", (*EV, "tasks=[boolq]", "data_dir=<bad>"), "boolq", "not found"),
    case("eval-answer-nan", (*EV, "tasks=[{name: t, path: <bad>/nan_answer.json, type: numeric}]"),
         "nan_answer.json", "'answer'", "nan"),
    case("eval-answer-list", (*EV, "tasks=[{name: t, path: <bad>/answer_list.json, type: numeric}]"),
         "answer_list.json", "'answer'"),
    case("eval-blank-instruction",
         (*EV, "tasks=[{name: t, path: <bad>/blank_instruction.json, type: numeric}]"),
         "blank_instruction.json", "'instruction'", "empty"),
    case("eval-model-and-run-dir", (*EV, "run_dir=<out>/run"), "run_dir"),
    case("eval-run-dir-missing", (*EV[:1], *EV[2:], "run_dir=/nonexistent/run"), "/nonexistent/run"),
    # ---------------------------------------------------------------- existing outputs
    case("finetune-existing-output", (*FT, "train.output_dir=<out>/run"), "<out>/run", "--resume"),
    case("finetune-resume-finished", (*FT, "train.output_dir=<out>/run", "--resume"), "<out>/run",
         "DONE"),
    case("finetune-resume-and-overwrite", (*FT, "--resume", "--overwrite"), "--overwrite"),
    case("finetune-output-is-file", (*FT, "train.output_dir=<out>/notes.txt"), "notes.txt",
         "file"),
    case("finetune-overwrite-bad-data", (*FT, "train.output_dir=<out>/run",
         "data.train_files=[<bad>/invalid.json]", "--overwrite"), "invalid.json"),
    case("finetune-overwrite-bad-model", (*FT, "train.output_dir=<out>/run",
         "model.name_or_path=/nonexistent/model", "--overwrite"), "/nonexistent/model"),
    case("finetune-overwrite-bad-peft", (*FT, "train.output_dir=<out>/run",
         "peft.method=notapeft", "--overwrite"), "peft.method"),
    case("flag-between-overrides", (*FT, "--overwrite", "train.gradient_accumulation_steps=2"),
         "kdlab finetune: error", "'train.gradient_accumulation_steps'",
         "did you mean 'train.batch_size'"),
    case("distill-existing-output", (*DI, "train.output_dir=<out>/run"), "<out>/run", "--resume"),
    case("distill-overwrite-bad-data", (*DI, "train.output_dir=<out>/run",
         "data.train_files=[<bad>/empty.json]", "--overwrite"), "empty.json"),
    case("eval-existing-output", (*EV, "output_dir=<out>/eval"), "<out>/eval", "--resume"),
    case("eval-overwrite-unknown-task", (*EV, "output_dir=<out>/eval", "tasks=[gsm9k]",
         "--overwrite"), "gsm9k"),
    case("eval-overwrite-bad-limit", (*EV, "output_dir=<out>/eval", "limit=-3", "--overwrite"),
         "'limit'", "-3"),
    case("eval-overwrite-foreign-files", (*EV, "output_dir=<out>", "--overwrite"), "notes.txt",
         "did not write"),
    # ------------------------------------------------ --overwrite owns only kdlab's files
    case("finetune-overwrite-user-files", (*FT, "train.output_dir=<out>", "--overwrite"),
         "notes.txt", "did not write", "nothing was deleted"),
    case("finetune-overwrite-empty-output-dir", (*FT, "train.output_dir=", "--overwrite"),
         "train.output_dir is empty"),
    case("finetune-overwrite-symlink", (*FT, "train.output_dir=<out>/link", "--overwrite"),
         "<out>/link", "symbolic link"),
    case("eval-overwrite-dot-files", (*EV, "output_dir=<out>/dotted", "--overwrite"),
         "<out>/dotted", ".env", "did not write"),
    case("eval-overwrite-symlink", (*EV, "output_dir=<out>/link", "--overwrite"), "symbolic link"),
    # ---------------------------- --overwrite replaces nothing before the new run can start
    case("finetune-overwrite-missing-target-modules", (*FT, "train.output_dir=<out>/run",
         "peft.target_modules=[nope]", "--overwrite"), "'nope'", subprocess=True),
    case("finetune-overwrite-truncated-weights", (*FT, "train.output_dir=<out>/run",
         "model.name_or_path=<models>/truncated_weights", "--overwrite"), "truncated_weights",
         "damaged or truncated"),
    case("distill-overwrite-missing-target-modules", (*DI, "train.output_dir=<out>/run",
         "peft.target_modules=[nope]", "--overwrite"), "'nope'"),
    case("distill-overwrite-teacher-vocabulary", (*DI[:2],
         "teacher.model.name_or_path=<models>/narrow_teacher", *DI[3:8],
         "train.output_dir=<out>/run", "--overwrite"), "logit widths", "smaller"),
    case("distill-seqkd-overwrite-lone-surrogate", (*DI, "train.output_dir=<out>/run",
         "distill.method=seqkd", "distill.generation.max_new_tokens=4",
         "data.train_files=[<bad>/surrogate.json]", "--overwrite"), "surrogate.json",
         "unpaired surrogate"),
    case("distill-overwrite-bad-options", (*DI, "train.output_dir=<out>/run",
         "peft.options={foo: 1}", "--overwrite"), "peft.options"),
    case("eval-overwrite-foreign-adapter", (*EV, "output_dir=<out>/eval", "adapter=<adapter>",
         "--overwrite"), "<adapter>", "does not fit", subprocess=True),
    case("eval-overwrite-truncated-adapter", (*EV, "output_dir=<out>/eval",
         "adapter=<models>/truncated_adapter", "--overwrite"), "truncated_adapter",
         "damaged or truncated"),
    case("eval-overwrite-truncated-weights", (*EV, "output_dir=<out>/eval",
         "model.name_or_path=<models>/truncated_weights", "--overwrite"), "truncated_weights",
         "damaged or truncated"),
    # ---------------------------------------------------------------- sweeps
    case("sweep-name-escapes", ("sweep", "name=/../../x", "students=[<tiny>]", "methods=[sft]",
         "out_dir=<out>/new", "--only-plan"), "sweep name '/../../x'"),
    case("sweep-out-dir-is-a-file-dry-run", ("sweep", "students=[<tiny>]", "methods=[sft]",
         "out_dir=<out>/notes.txt", "--dry-run", "--no-eval"), "<out>/notes.txt", "not a directory"),
    case("sweep-out-dir-is-a-file-only-plan", ("sweep", "students=[<tiny>]", "methods=[sft]",
         "out_dir=<out>/notes.txt", "--only-plan"), "<out>/notes.txt", "not a directory"),
    case("sweep-students-differ-by-case", ("sweep", "students={Tiny: <tiny>, tiny: <tiny>}",
         "methods=[sft]", "out_dir=<out>/new", "--dry-run", "--no-eval"), "'Tiny' and 'tiny'",
         "only by case"),
]  # fmt: skip


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """Paths substituted into the cases."""

    values: dict[str, Path]

    def argv(self, case: Case) -> list[str]:
        return [self.fill(item) for item in case.argv]

    def fill(self, text: str) -> str:
        for key, value in self.values.items():
            text = text.replace(f"<{key}>", str(value))
        return text


def _existing_outputs(out: Path) -> None:
    run = out / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name_or_path: somewhere\n")
    (run / "run.json").write_text(json.dumps({"stage": "finetune", "name": "run"}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"trained weights")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "DONE").write_text("{}")
    evaluation = out / "eval"
    (evaluation / "gsm8k").mkdir(parents=True)
    (evaluation / "config.yaml").write_text("tasks: [gsm8k]\n")
    (evaluation / "gsm8k" / "predictions.jsonl").write_text('{"index": 0}\n')
    (evaluation / "gsm8k" / "metrics.json").write_text('{"accuracy": 50.0}\n')
    (evaluation / "DONE").write_text("{}")
    (out / "notes.txt").write_text("the user's own file\n")
    # an evaluation folder the user keeps other things in (eval --overwrite owned every
    # dot-file once)
    shutil.copytree(evaluation, out / "dotted")
    (out / "dotted" / ".env").write_text("API_KEY=secret\n")
    (out / "dotted" / ".git").mkdir()
    (out / "dotted" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "link").symlink_to(run, target_is_directory=True)


def _odd_models(models: Path, tiny: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    pickle_only = models / "pickle_only"
    shutil.copytree(tiny, pickle_only)
    state = load_file(pickle_only / "model.safetensors")
    (pickle_only / "model.safetensors").unlink()
    torch.save(state, pickle_only / "pytorch_model.bin")
    no_config = models / "no_config"
    shutil.copytree(tiny, no_config)
    (no_config / "config.json").unlink()
    (models / "weights.bin").write_bytes(b"\x80\x04not a model")
    other = models / "other_tokenizer"
    shutil.copytree(tiny, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(other)
    truncated = models / "truncated_weights"  # a copy cut short, as a full disk leaves it
    shutil.copytree(tiny, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    narrow = models / "narrow_teacher"  # the same tokenizer, an lm_head too narrow for it
    build_tiny_model(len(tokenizer) - 8, layers=2, hidden=16, seed=3).save_pretrained(narrow)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(narrow)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    foreign_adapter_dir: Path,
    eval_data_dir: Path,
) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    models = root / "models"
    models.mkdir()
    _odd_models(models, tiny_model_dir)
    adapter = models / "truncated_adapter"
    shutil.copytree(foreign_adapter_dir, adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return World(
        {
            "bad": CORPUS,
            "tiny": tiny_model_dir,
            "teacher": tiny_teacher_dir,
            "models": models,
            "adapter": foreign_adapter_dir,
            "evaldata": eval_data_dir,
        }
    )


@pytest.fixture
def outputs(world: World, tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    out.mkdir()
    _existing_outputs(out)
    world.values["out"] = out
    return out


def _check_error(case: Case, world: World, code: int, stdout: str, stderr: str) -> None:
    # transformers draws a "Loading weights" progress bar on stderr before an adapter fails
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert code == 2, f"{case.id}: exit code {code}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-3000:]
    assert len(lines) == 1, f"{case.id}: expected one line on stderr, got:\n{stderr}"
    for needle in case.needles:
        assert world.fill(needle) in lines[0], f"{case.id}: {needle!r} not in {lines[0]!r}"


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    text = " ".join(a for c in CASES for a in c.argv)
    unused = [p.name for p in CORPUS.iterdir() if f"<bad>/{p.name}" not in text]
    assert not unused, f"corpus files no case uses: {unused}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_in_process(
    case: Case, world: World, outputs: Path, snapshot, capsys
) -> None:
    before = (snapshot(outputs), snapshot(CORPUS))
    capsys.readouterr()
    try:
        code = cli_main(world.argv(case))
    except SystemExit as exit_:  # argparse errors
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    _check_error(case, world, code, captured.out, captured.err)
    _check_unchanged(before[0], snapshot(outputs))
    assert snapshot(CORPUS) == before[1], "an input file changed"


def _check_unchanged(before: dict, after: dict) -> None:
    """Existing files are untouched; new files only in the new run's folder ``<out>/new``."""
    assert {name: after.get(name) for name in before} == before, "existing files changed"
    created = sorted(after.keys() - before.keys())
    assert all(name.startswith("new/") for name in created), created


SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=() if i == 0 else pytest.mark.slow, id=c.id)
        for i, c in enumerate(SUBPROCESS_CASES)
    ],
)
def test_bad_input_is_refused_by_a_real_process(
    case: Case, world: World, outputs: Path, snapshot, run_kdlab
) -> None:
    before = snapshot(outputs)
    result = run_kdlab(world.argv(case))
    _check_error(case, world, result.returncode, result.stdout, result.stderr)
    _check_unchanged(before, snapshot(outputs))


def test_a_failed_model_load_does_not_block_the_next_eval(world: World, outputs: Path) -> None:
    """eval writes config.yaml before it loads the model; a failed load must not make the
    corrected command need --resume or --overwrite."""
    bad = next(c for c in CASES if c.id == "adapter-other-base")
    assert cli_main(world.argv(bad)) == 2
    written = [p.name for p in (outputs / "new").rglob("*") if p.is_file()]
    assert sorted(written) == sorted(["config.yaml", LOCK_FILE])
    assert cli_main([world.fill(a) for a in EV]) == 0
    assert (outputs / "new" / "DONE").is_file()
