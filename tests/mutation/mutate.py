"""``make mutate``: mutation testing of the numeric core with mutmut (3.x), module by module.

Each group below is a set of source files and *its own* test files. For every group this
script builds a scratch copy of the repository under ``build/mutmut/<group>/`` (the tracked
files only, so a run never touches the working tree), writes a ``[tool.mutmut]`` section for
that group into the copy's ``pyproject.toml``, runs ``mutmut run`` there and prints the
mutants that survived (a mutant is a small change of the code, e.g. ``<`` → ``<=``, ``+`` →
``-``, a constant changed, a call's argument dropped; it *survives* when every test still
passes). How to read the report: docs/testing.md.

Not part of CI (minutes to hours on 2 cores). Usage::

    python tests/mutation/mutate.py                      # every group
    python tests/mutation/mutate.py losses extractors    # some groups
    python tests/mutation/mutate.py --budget 1800 losses # stop a group after 30 min
    python tests/mutation/mutate.py --report losses      # print the last run's report only

A run that stops at its budget keeps its results: the next run of the group continues where
it stopped (mutmut skips the mutants it has already judged, unless the sources or tests
changed). ``--fresh`` deletes the group's scratch copy first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: where the scratch copies go (``KDLAB_MUTMUT_DIR`` moves them, e.g. to compare two runs)
SCRATCH = Path(os.environ.get("KDLAB_MUTMUT_DIR", REPO_ROOT / "build" / "mutmut"))


@dataclass(frozen=True)
class Group:
    """Source files mutated together and the test files that must kill their mutants."""

    sources: tuple[str, ...]
    tests: tuple[str, ...]


GROUPS: dict[str, Group] = {
    "losses": Group(sources=("src/kdlab/losses/*",), tests=("tests/losses",)),
    "objective": Group(
        sources=("src/kdlab/training/objectives.py", "src/kdlab/training/forward.py"),
        tests=("tests/training/test_objectives.py",),
    ),
    "extractors": Group(
        sources=("src/kdlab/evaluation/extractors.py",),
        tests=("tests/evaluation/test_extractors.py", "tests/evaluation/test_extractor_details.py"),
    ),
    "analysis": Group(
        sources=(
            "src/kdlab/analysis/agreement.py",
            "src/kdlab/analysis/statistics.py",
            "src/kdlab/analysis/paired.py",
        ),
        tests=(
            "tests/analysis/test_agreement.py",
            "tests/analysis/test_statistics.py",
            "tests/analysis/test_paired.py",
            "tests/analysis/test_statistics_details.py",
        ),
    ),
}


def _toml_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def prepare(name: str, group: Group, *, fresh: bool) -> Path:
    """The group's scratch copy: tracked files + a ``[tool.mutmut]`` section."""
    workdir = SCRATCH / name
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in tracked:
        if not raw:
            continue
        source = REPO_ROOT / raw.decode()
        target = workdir / raw.decode()
        if source.is_symlink():
            if not target.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(os.readlink(source))
            continue
        if not source.is_file():
            continue
        if target.is_file() and target.read_bytes() == source.read_bytes():
            continue  # unchanged: keep mtimes, so mutmut keeps its earlier results
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    # tests look for the shared reference data next to the repository (kdlab_testing.SHARED)
    shared = REPO_ROOT.parent / "shared"
    link = workdir / "shared"  # mutants/tests/kdlab_testing.py: parents[1].parent
    if shared.is_dir() and not link.exists():
        link.symlink_to(shared.resolve())
    config = (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list(group.sources)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(group.tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        # torch is not fork-safe after it started its thread pools
        'process_isolation = "forkserver"\n'
    )
    pyproject = workdir / "pyproject.toml"
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if pyproject.read_text(encoding="utf-8") != text + config:
        pyproject.write_text(text + config, encoding="utf-8")
    return workdir


def _environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the mutated copy, never the working tree's src/
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def _mutmut(workdir: Path, *args: str, timeout: float | None = None) -> int:
    """``mutmut <args>`` in ``workdir``; its progress spinner goes to ``mutmut-run.log``."""
    command = [sys.executable, "-m", "mutmut", *args]
    log = workdir / "mutmut-run.log"
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=_environment(workdir),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the budget stops mutmut and its workers together
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            print(f"  (stopped at the budget of {timeout:.0f} s; run again to continue)")
            return 124
        except BaseException:  # Ctrl-C or SIGTERM of this script: stop mutmut's workers too
            _stop(process)
            raise


def _stop(process: subprocess.Popen) -> None:
    """Stop mutmut and every worker it forked (its own session)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def report(name: str, workdir: Path, *, diffs: bool) -> dict[str, int]:
    """Print the group's counts and surviving mutants; returns the counts."""
    if not (workdir / "mutants").is_dir():
        print(f"[{name}] no results yet")
        return {}
    subprocess.run(
        [sys.executable, "-m", "mutmut", "export-cicd-stats"],
        cwd=workdir,
        env=_environment(workdir),
        capture_output=True,
        check=False,
    )
    stats_file = workdir / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    listing = subprocess.run(
        [sys.executable, "-m", "mutmut", "results"],
        cwd=workdir,
        env=_environment(workdir),
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    survivors = [
        line.strip().rsplit(": ", 1)[0]
        for line in listing.splitlines()
        if line.strip().endswith(": survived")
    ]
    counts = {
        key: int(value)
        for key, value in stats.items()
        if isinstance(value, int) and not isinstance(value, bool) and (value or key == "survived")
    }
    if counts:
        judged = sum(value for key, value in counts.items() if key != "total")
        counts["not_checked"] = counts.get("total", judged) - judged
    summary = ", ".join(f"{key} {value}" for key, value in counts.items())
    print(f"\n[{name}] {summary}")
    for mutant in survivors:
        if diffs:
            shown = subprocess.run(
                [sys.executable, "-m", "mutmut", "show", mutant],
                cwd=workdir,
                env=_environment(workdir),
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            print(shown.rstrip())
        else:
            print(f"  survived: {mutant}")
    return counts


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"some of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per group")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--report", action="store_true", help="only print the last results")
    parser.add_argument("--names", action="store_true", help="survivor names, not diffs")
    parser.add_argument(
        "--tests", nargs="+", default=None, help="replace the group's test files (one group)"
    )
    args = parser.parse_args(argv)
    names = args.groups or list(GROUPS)
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        parser.error(f"unknown group {unknown[0]!r}; groups: {', '.join(GROUPS)}")
    totals: dict[str, dict[str, int]] = {}
    for name in names:
        workdir = SCRATCH / name
        group = GROUPS[name]
        if args.tests:
            group = Group(sources=group.sources, tests=tuple(args.tests))
        if not args.report:
            workdir = prepare(name, group, fresh=args.fresh)
            print(f"[{name}] mutmut run in {workdir}")
            code = _mutmut(
                workdir, "run", "--max-children", str(args.max_children), timeout=args.budget
            )
            if code not in (0, 124):
                tail = (workdir / "mutmut-run.log").read_text(errors="replace")[-3000:]
                print(f"  mutmut run failed ({code}):\n{tail}")
        totals[name] = report(name, workdir, diffs=not args.names)
    print(
        "\nsurvivors per group: "
        + ", ".join(
            f"{name} {counts.get('survived', '?')}/{counts.get('total', '?')}"
            for name, counts in totals.items()
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
