"""Which process of a distributed launch this is, without importing torch or accelerate."""

from __future__ import annotations

import os

__all__ = ["is_main_launch_process"]


def is_main_launch_process() -> bool:
    """True in the first process of a ``torch.distributed.run`` / ``accelerate launch`` group
    (``RANK`` 0), and in a plain single process. Used so that one line is printed per run,
    not one per process."""
    return int(os.environ.get("RANK", "0") or 0) == 0
