"""Grid expansion: which runs a grid holds, their names, configs and dependencies."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.config.methods import HIDDEN_CACHE
from kdlab.config.sweep import load_sweep_config
from kdlab.errors import ConfigError
from kdlab.sweep.grid import SweepPlan, config_differences, plan_sweep


def plan_of(tmp_path: Path, grid: dict[str, Any], *overrides: str) -> SweepPlan:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    return plan_sweep(load_sweep_config(path, overrides), grid_path=str(path))


BASE: dict[str, Any] = {
    "out_dir": "out",
    "families": {"math": {}, "commonsense": {}},
    "teachers": {"T-3B": "org/T-3B"},
    "students": {"S-0.5B": "org/S-0.5B", "S-1.5B": "org/S-1.5B"},
    "methods": {"sft": {}, "forward_kl": {}, "seqkd": {}},
    "temperatures": [1, 2],
    "seeds": [6, 7],
    "reuse_teacher_sft": False,
}


def by_kind(plan: SweepPlan) -> Counter:
    return Counter(run.kind for run in plan.runs)


def test_axes_expand_as_documented(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, BASE)
    kinds = by_kind(plan)
    # 2 families × 2 seeds: 1 teacher, 2 SFT students (not per temperature), and per student
    # forward_kl at T1 and T2 plus seqkd once (no divergence → no temperature).
    assert kinds["teacher"] == 4
    assert kinds["sft"] == 2 * 4
    assert kinds["kd"] == 2 * 3 * 4
    assert kinds["eval"] == 4 + 8 + 24
    assert kinds["analysis"] == 1
    names = {run.run_dir.as_posix() for run in plan.runs}
    assert "out/math/teachers/T-3B__s6" in names
    assert "out/math/students/S-0.5B__sft__s7" in names
    assert "out/commonsense/students/S-1.5B__forward_kl__T2__from-T-3B__s6" in names
    assert "out/math/students/S-0.5B__seqkd__from-T-3B__s6" in names
    assert plan.stage("finetune")[0].config.role == "teacher"
    # Execution order: teachers, then students, then evaluations, then the analysis.
    stages = [run.stage for run in plan.runs]
    assert stages == sorted(stages, key=["finetune", "distill", "eval", "analysis"].index)


def test_students_reuse_their_teacher_run(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, BASE)
    teacher_dirs = {run.run_dir for run in plan.stage("finetune")}
    for run in plan.stage("distill"):
        if run.kind == "kd":
            teacher_dir = Path(run.config.teacher.run_dir)
            assert teacher_dir in teacher_dirs
            assert run.depends_on == (teacher_dir,)
            assert teacher_dir.name.endswith(f"__s{run.config.train.seed}")
            assert teacher_dir.parts[1] == run.family
            assert run.config.teacher.adapter is None
        else:
            assert run.depends_on == ()
            assert run.config.distill.method == "sft"
    for run in plan.stage("eval"):
        assert run.run_dir.name == "eval"
        assert run.config.run_dir == str(run.depends_on[0])
        assert run.config.output_dir == str(run.run_dir)


def test_names_are_deterministic(tmp_path: Path) -> None:
    first = [run.key for run in plan_of(tmp_path, BASE).runs]
    second = [run.key for run in plan_of(tmp_path, BASE).runs]
    assert first == second
    assert len(set(first)) == len(first)


def test_ablation_axes_apply_to_kd_methods_only(tmp_path: Path) -> None:
    grid = {
        **BASE,
        "families": {"math": {}},
        "seeds": [6],
        "methods": {"sft": {}, "forward_kl": {}, "seqkd": {}},
        "temperatures": [1],
        "noise_stds": [0, 2],
        "base_teacher": [False, True],
    }
    plan = plan_of(tmp_path, grid)
    students = plan.stage("distill")
    sft = [run for run in students if run.kind == "sft"]
    assert len(sft) == 2
    assert all(run.config.distill.noise_std == 0 for run in sft)
    forward = [run for run in students if run.params["method"] == "forward_kl"]
    assert len(forward) == 2 * 2 * 2  # students × noise × base teacher
    seqkd = [run for run in students if run.params["method"] == "seqkd"]
    assert len(seqkd) == 2 * 2  # noise needs a divergence; base teacher applies
    base = next(
        run
        for run in forward
        if run.params["base_teacher"] and run.params["noise_std"] == 2 and "0.5B" in run.name
    )
    assert base.name == "S-0.5B__forward_kl__T1__noise2__base-teacher__from-T-3B__s6"
    assert base.config.teacher.adapter == "none"
    assert base.config.teacher.run_dir == str(Path("out/math/teachers/T-3B__s6"))
    assert base.config.distill.noise_std == 2.0


def test_per_axis_overrides(tmp_path: Path) -> None:
    grid = {
        "out_dir": "out",
        "families": {
            "math": {
                "defaults": {"data": {"train_files": ["m.json"]}, "train": {"num_epochs": 4}},
                "eval": {"tasks": ["math"]},
            },
            "commonsense": {
                "defaults": {"data": {"train_files": ["c.json"]}, "train": {"num_epochs": 3}},
                "eval": {"tasks": ["commonsense"]},
            },
        },
        "teachers": {
            "T": {
                "model": {"name_or_path": "org/T-8B", "dtype": "bfloat16"},
                "defaults": {"train": {"micro_batch_size": 2}},
                "student_defaults": {"train": {"micro_batch_size": 1}},
            }
        },
        "students": {"S": {"model": {"name_or_path": "org/T-8B", "slice_layers": 4}}},
        "methods": {
            "sft": {},
            "fkl_skew": {"method": "skew_forward_kl", "distill": {"skew": 0.2}},
            "gkd": {"temperatures": [1], "defaults": {"train": {"learning_rate": 1e-4}}},
        },
        "temperatures": [1, 2],
        "defaults": {"peft": {"r": 4}, "model": {"attn_implementation": "sdpa"}},
        "eval": {"limit": 5},
    }
    plan = plan_of(tmp_path, grid)
    teacher = next(run for run in plan.stage("finetune") if run.family == "commonsense")
    assert teacher.config.model.dtype == "bfloat16"
    assert teacher.config.model.attn_implementation == "sdpa"
    assert teacher.config.train.micro_batch_size == 2
    assert teacher.config.train.num_epochs == 3
    assert teacher.config.data.train_files == ["c.json"]
    assert teacher.config.peft.r == 4
    assert teacher.config.task_family == "commonsense"
    skew = [run for run in plan.stage("distill") if run.params["method"] == "fkl_skew"]
    assert {run.config.distill.temperature for run in skew} == {1.0, 2.0}
    assert all(run.config.distill.method == "skew_forward_kl" for run in skew)
    assert all(run.config.distill.skew == 0.2 for run in skew)
    assert all(run.config.student.slice_layers == 4 for run in skew)
    assert all(run.config.train.micro_batch_size == 1 for run in skew)
    assert all(run.name.startswith("S__fkl_skew__T") for run in skew)
    gkd = [run for run in plan.stage("distill") if run.params["method"] == "gkd"]
    assert len(gkd) == 2  # one per family: T = 1 only
    assert all(run.config.train.learning_rate == 1e-4 for run in gkd)
    sft = [run for run in plan.stage("distill") if run.kind == "sft"]
    assert all(run.config.train.micro_batch_size == 4 for run in sft)  # no teacher overrides
    evals = {run.family: run.config for run in plan.stage("eval")}
    assert evals["math"].tasks == ["math"] and evals["commonsense"].tasks == ["commonsense"]
    assert evals["math"].limit == 5


def test_teacher_temperatures_and_pairing(tmp_path: Path) -> None:
    grid = {
        "out_dir": "out",
        "families": ["math"],
        "teachers": {
            "Big-14B": {"model": "org/Big-14B", "temperatures": [1]},
            "Mid-3B": "org/Mid-3B",
        },
        "students": ["org/Small-0.5B", "org/Mid-3B"],
        "methods": ["forward_kl"],
        "temperatures": [1, 2, 5],
        "pairing": "smaller",
        "eval": {"enabled": False},
    }
    plan = plan_of(tmp_path, grid)
    pairs = Counter((run.params["teacher"], run.params["student"]) for run in plan.stage("distill"))
    assert pairs == {
        ("Big-14B", "Small-0.5B"): 1,
        ("Big-14B", "Mid-3B"): 1,
        ("Mid-3B", "Small-0.5B"): 3,
    }
    assert not plan.stage("eval") and not plan.stage("analysis")


def test_sft_student_reuses_an_identical_teacher_run(tmp_path: Path) -> None:
    grid = {**BASE, "families": {"math": {}}, "seeds": [6], "methods": {"sft": {}}}
    grid["students"] = {**BASE["students"], "S-3B": "org/T-3B"}
    plan = plan_of(tmp_path, {**grid, "reuse_teacher_sft": True})
    reused = [run for run in plan.runs if run.reuses is not None]
    assert [run.name for run in reused] == ["S-3B__sft__s6"]
    assert reused[0].reuses == Path("out/math/teachers/T-3B__s6")
    assert reused[0] not in plan.training
    assert all(run.name != "S-3B__sft__s6" for run in plan.stage("eval"))
    # Different settings → its own run.
    grid["students"]["S-3B"] = {"model": "org/T-3B", "defaults": {"peft": {"r": 16}}}
    plan = plan_of(tmp_path, {**grid, "reuse_teacher_sft": True})
    assert not [run for run in plan.runs if run.reuses is not None]


def test_estimates(tmp_path: Path) -> None:
    grid = {
        **BASE,
        "families": {"math": {"estimate": {"train_records": 1016, "eval_items": 100}}},
        "seeds": [6],
        "defaults": {"data": {"val_set_size": 16}, "train": {"num_epochs": 2}},
        "eval": {"tasks": ["gsm8k", "SVAMP"], "limit": 20},
    }
    plan = plan_of(tmp_path, grid)
    teacher = plan.stage("finetune")[0]
    assert teacher.estimate.steps == 2 * 1000 // 16
    assert teacher.estimate.seconds > 0
    kd = next(run for run in plan.stage("distill") if run.kind == "kd")
    assert kd.estimate.seconds > plan.stage("distill")[0].estimate.seconds  # a teacher forward
    assert plan.stage("eval")[0].estimate.items == 40  # 2 tasks × limit 20 < 100


def test_sweep_estimates_read_the_teacher_cache_settings(tmp_path: Path) -> None:
    """``kdlab sweep`` plans KD runs on the teacher-output cache: their estimate is a cached
    step (``estimate.cached_step_factor`` × an SFT step) plus the cache's build, paid once
    per cache. (The sweep's own estimate used to ignore the cache and that setting.)"""
    grid = {
        **BASE,
        "families": {"math": {"estimate": {"train_records": 1016}}},
        "students": {"S-0.5B": "org/S-0.5B"},
        "methods": {"sft": {}, "forward_kl": {}},
        "seeds": [6],
        "defaults": {"data": {"val_set_size": 16, "cutoff_len": 128}},
    }
    records = 2000  # the default generated:arithmetic source's n
    for factor in (1.2, 2.0):
        plan = plan_of(tmp_path, grid, f"estimate.cached_step_factor={factor}")
        estimate = plan.config.estimate
        sft = next(run for run in plan.stage("distill") if run.kind == "sft")
        first, second = (run for run in plan.stage("distill") if run.kind == "kd")
        assert first.config.distill.teacher_cache == second.config.distill.teacher_cache == "auto"
        build = records * 128 / 1000 * 3.0 * estimate.teacher_s_per_ktoken_per_b
        cached = factor * sft.estimate.seconds
        assert first.estimate.seconds == pytest.approx(cached + build)
        assert second.estimate.seconds == pytest.approx(cached)  # T = 2 reads T = 1's cache
    # On-policy GKD batches run the live teacher even with a cache: the live step, × its
    # method_factor (3), plus the build of the cache its off-policy batches read.
    gkd_plan = plan_of(tmp_path, {**grid, "methods": {"sft": {}, "gkd": {}}})
    sft = next(run for run in gkd_plan.stage("distill") if run.kind == "sft")
    first, second = (run for run in gkd_plan.stage("distill") if run.kind == "kd")
    assert first.config.distill.teacher_cache == "auto"
    kilotokens = first.config.train.batch_size * 128 / 1000
    rate = gkd_plan.config.estimate.teacher_s_per_ktoken_per_b
    live_step = sft.estimate.seconds + first.estimate.steps * kilotokens * 3.0 * rate
    build = records * 128 / 1000 * 3.0 * rate
    assert gkd_plan.config.estimate.method_factor["gkd"] == 3.0
    assert first.estimate.seconds == pytest.approx(3.0 * live_step + build)
    assert second.estimate.seconds == pytest.approx(3.0 * live_step)
    # A live teacher (no cache) costs its forward in every step, whatever the factor.
    live_grid = {**grid, "methods": {"sft": {}, "forward_kl": {"distill": {"teacher_cache": None}}}}
    live = plan_of(tmp_path, live_grid, "estimate.cached_step_factor=2.0")
    sft = next(run for run in live.stage("distill") if run.kind == "sft")
    kd = next(run for run in live.stage("distill") if run.kind == "kd")
    assert kd.config.distill.teacher_cache is None
    kilotokens = kd.config.train.batch_size * 128 / 1000
    teacher_term = (
        kd.estimate.steps * kilotokens * 3.0 * live.config.estimate.teacher_s_per_ktoken_per_b
    )
    assert kd.estimate.seconds == pytest.approx(sft.estimate.seconds + teacher_term)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teachers": {"T-3B": {"model": "x", "students": ["nobody"]}}}, "unknown student"),
        ({"methods": {"forward_kl": {"distill": {"temperature": 3}}}}, "come from the grid"),
        ({"methods": {"kld2": {}}}, "is not valid"),
        ({"students": {"bad__name": "x"}}, "no '__'"),
        ({"defaults": {"trian": {}}}, "unknown section 'trian'"),
        ({"temperatures": [0]}, "must be > 0"),
        ({"teachers": {"T-3B": {"model": "x", "size": 3}}}, "teachers.T-3B.size"),
        ({"eval": {"run_dir": "x"}}, "set by the sweep"),
        ({"defaults": {"train": {"learning_rate": -1}}}, "learning_rate"),
        ({"eval": {"generation": {"top_k": -1}}}, "top_k"),
        ({"teachers": {}}, "need a teacher"),
    ],
)
def test_bad_grids_fail_with_one_clear_line(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_of(tmp_path, {**BASE, **change})
    assert message in caught.value.one_line()
    assert "grid.yaml" in caught.value.one_line()


def test_extends_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "ignored",
                "out_dir": "common",
                **{k: BASE[k] for k in ("families", "teachers", "students")},
            }
        ),
        encoding="utf-8",
    )
    grid = tmp_path / "mine.yaml"
    grid.write_text(
        yaml.safe_dump({"extends": "base/common.yaml", "methods": ["sft"], "seeds": [1]}),
        encoding="utf-8",
    )
    config = load_sweep_config(grid, ["out_dir=elsewhere", "task_families=[math]"])
    assert config.name == "mine"
    assert config.out_dir == "elsewhere"
    assert config.selected_families == ["math"]
    assert list(config.teachers) == ["T-3B"]
    plan = plan_sweep(config)
    assert {run.family for run in plan.training} == {"math"}


def test_config_differences_ignore_paths_and_new_fields() -> None:
    saved = {"train": {"output_dir": "/a", "learning_rate": 0.0003}, "old": 1}
    planned = {"train": {"output_dir": "/b", "learning_rate": 3e-4, "new": 2}}
    assert config_differences(saved, planned) == []
    planned["train"]["learning_rate"] = 1e-3
    assert config_differences(saved, planned) == ["train.learning_rate"]


def test_shared_distill_defaults_apply_where_a_method_reads_them(tmp_path: Path) -> None:
    """kd_weight in the grid's defaults reaches the KD runs; an SFT run, which reads no
    kd_weight, keeps the default instead of being refused (or silently carrying it)."""
    grid = {
        **BASE,
        "methods": {"sft": {}, "forward_kl": {}},
        "defaults": {"distill": {"kd_weight": 0.5}},
    }
    plan = plan_of(tmp_path, grid)
    students = plan.stage("distill")
    kd = [run for run in students if run.kind == "kd"]
    sft = [run for run in students if run.kind == "sft"]
    assert kd and {run.config.distill.kd_weight for run in kd} == {0.5}
    assert sft and {run.config.distill.kd_weight for run in sft} == {1.0}


def test_a_shared_distill_default_no_run_reads_is_refused(tmp_path: Path) -> None:
    grid = {
        **BASE,
        "methods": {"sft": {}, "forward_kl": {}},
        "defaults": {"distill": {"generation": {"max_new_tokens": 16}}},
    }
    with pytest.raises(ConfigError, match=r"distill\.generation\.max_new_tokens, which no run"):
        plan_of(tmp_path, grid)
    grid["methods"] = {"sft": {}, "gkd": {"temperatures": [1]}}
    gkd = [run for run in plan_of(tmp_path, grid).stage("distill") if run.kind == "kd"]
    assert {run.config.distill.generation.max_new_tokens for run in gkd} == {16}


@pytest.mark.parametrize("key", ["temperature", "noise_std", "method"])
def test_defaults_may_not_set_an_axis_controlled_key(tmp_path: Path, key: str) -> None:
    """Today's main silently overwrote defaults.distill.temperature with the grid's axis."""
    value = "forward_kl" if key == "method" else 3.0
    grid = {**BASE, "defaults": {"distill": {key: value}}}
    with pytest.raises(ConfigError, match=rf"distill\.{key} comes from the grid's axes"):
        plan_of(tmp_path, grid)


def test_a_method_entry_that_sets_a_key_its_method_ignores_is_refused(tmp_path: Path) -> None:
    grid = {**BASE, "methods": {"sft": {}, "forward_kl": {"distill": {"beta": 0.2}}}}
    with pytest.raises(ConfigError, match=r"'distill\.beta' = 0\.2: has no effect"):
        plan_of(tmp_path, grid)


def test_the_teacher_cache_is_planned_exactly_where_it_serves_the_run(tmp_path: Path) -> None:
    """`teacher_cache: auto` on every KD run the cache serves (T = 2 and 5 included: the
    hidden-state cache is exact there), never on SFT, seqKD or noise runs; a grid setting
    wins. Before the hidden-state kind, the T = 2 and 5 runs had no cache."""
    grid = {
        **BASE,
        "families": {"math": {}},
        "students": {"S-0.5B": "org/S-0.5B"},
        "seeds": [6],
        "methods": {
            "sft": {},
            "forward_kl": {},
            "reverse_kl": {},
            "gkd": {"temperatures": [1]},
            "seqkd": {},
        },
        "temperatures": [1, 2, 5],
        "noise_stds": [0, 1],
    }
    students = plan_of(tmp_path, grid).stage("distill")
    cached = {
        (
            run.params["method"],
            run.config.distill.temperature,
        ): run.config.distill.teacher_cache_kind
        for run in students
        if run.config.distill.teacher_cache == "auto"
    }
    assert cached == {
        ("forward_kl", 1.0): HIDDEN_CACHE,
        ("forward_kl", 2.0): HIDDEN_CACHE,
        ("forward_kl", 5.0): HIDDEN_CACHE,
        ("reverse_kl", 1.0): HIDDEN_CACHE,
        ("reverse_kl", 2.0): HIDDEN_CACHE,
        ("reverse_kl", 5.0): HIDDEN_CACHE,
        ("gkd", 1.0): HIDDEN_CACHE,
    }
    for run in students:
        serves = run.kind == "kd" and run.params["method"] != "seqkd"
        serves = serves and run.config.distill.noise_std == 0
        assert (run.config.distill.teacher_cache == "auto") is serves, run.name
    # The grid's own setting wins: null keeps every run on the live teacher.
    grid["defaults"] = {"distill": {"teacher_cache": None}}
    grid["methods"] = {"forward_kl": {}}
    students = plan_of(tmp_path, grid).stage("distill")
    assert students and all(run.config.distill.teacher_cache is None for run in students)
