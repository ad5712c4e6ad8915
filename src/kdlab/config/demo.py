"""``kdlab demo`` configuration: where the miniature pipeline writes, how big, which model."""

from __future__ import annotations

from dataclasses import dataclass

from kdlab.config.core import check, config_field


@dataclass
class DemoConfig:
    """``kdlab demo``: the paper's pipeline in miniature on the embedded SmolLM2-135M."""

    out: str = config_field("runs/demo", help="Output directory of the whole demo.")
    quick: bool = config_field(
        False, help="A first look in a few minutes (fewer problems and steps)."
    )
    model: str = config_field(
        "smollm2-135m", help="Teacher base model (default: the embedded SmolLM2-135M)."
    )

    def __post_init__(self) -> None:
        check(bool(self.out.strip()), "out", "must not be empty")
        check(bool(self.model.strip()), "model", "must not be empty")


__all__ = ["DemoConfig"]
