"""Capped data are a seeded sample, not the file's first records (issue 21).

Both caps are checked as *sets* of records (the mixture is shuffled afterwards, so an order
check would pass even if the cap took the first N): a mapping's ``limit`` and
``data.max_records`` must pick records from the whole source, differently per seed, and
the same ones for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlab.config.schema import DataConfig
from kdlab.data.records import load_mixture, load_records
from kdlab.training.common import load_training_records


def _instructions(records: list[dict[str, Any]]) -> set[str]:
    return {record["instruction"] for record in records}


def test_a_source_limit_is_a_seeded_sample_of_the_whole_source(
    write_json: Callable[..., Path], make_record: Callable[..., dict[str, Any]]
) -> None:
    path = str(write_json([make_record(i) for i in range(40)]))
    first_five = _instructions(load_records(path)[:5])
    samples = {
        seed: _instructions(load_mixture([{"path": path, "limit": 5}], seed=seed))
        for seed in range(4)
    }
    assert all(len(sample) == 5 for sample in samples.values())
    assert all(sample != first_five for sample in samples.values())
    assert len(set(map(frozenset, samples.values()))) > 1  # the sample depends on the seed
    again = _instructions(load_mixture([{"path": path, "limit": 5}], seed=2))
    assert again == samples[2]
    # over the seeds, records from the whole file are picked, not one end of it
    picked = set().union(*samples.values())
    positions = sorted(int(text.split()[1].rstrip(":")) for text in picked)
    assert positions[0] < 20 <= positions[-1]


def test_max_records_is_a_seeded_sample_of_the_mixture(
    write_json: Callable[..., Path], make_record: Callable[..., dict[str, Any]]
) -> None:
    first = str(write_json([make_record(i) for i in range(30)], "first.json"))
    second = str(write_json([make_record(100 + i) for i in range(30)], "second.json"))

    def capped(seed: int) -> list[dict[str, Any]]:
        return load_training_records(
            DataConfig(train_files=[first, second], max_records=6, seed=seed)
        )

    head = _instructions(load_records(first)[:6])
    samples = {seed: _instructions(capped(seed)) for seed in range(4)}
    assert all(len(sample) == 6 for sample in samples.values())
    assert all(sample != head for sample in samples.values())
    assert len(set(map(frozenset, samples.values()))) > 1
    assert _instructions(capped(1)) == samples[1]
    # the cap applies after mixing: both sources are represented across the seeds
    sources = {record["source"] for seed in range(4) for record in capped(seed)}
    assert sources == {first, second}
