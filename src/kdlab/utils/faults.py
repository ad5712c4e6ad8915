"""Fault injection for crash-safety tests: ``KDLAB_FAULT=POINT[:WHEN]`` kills the process.

The code calls :func:`maybe_fault` at named points (one line each); when the environment
variable ``KDLAB_FAULT`` names that point, the process sends itself ``SIGKILL`` there — no
``finally`` block, no flush, no atexit handler runs, exactly like an OOM kill or a pulled
plug. Without the variable every call returns at once (one global lookup and a comparison).

``WHEN`` selects the hit:

- a call that passes a ``value`` fires when ``str(value) == WHEN`` (``step:3`` → after
  optimizer step 3; ``atomic_directory:checkpoint-2`` → while ``checkpoint-2`` is staged);
- a call without a value fires on its ``WHEN``-th hit in this process (``eval_output:3`` →
  after the third prediction line is appended);
- no ``WHEN`` fires on the first hit.

Points (see ``docs/reliability.md``):

=====================  ======================================================  ==========
point                  where                                                   value
=====================  ======================================================  ==========
``backward``           training: after a micro-batch's backward pass            hit count
``step``               training: after the optimizer update of step N           step N
``metrics``            training: after step N's metrics line is appended        step N
``checkpoint_write``   training: checkpoint-N staged, before the rename         step N
``checkpoint``         training: checkpoint-N renamed into place (not pruned)   step N
``final_save``         training: loop finished, before the adapter/model save   —
``atomic_directory``   any directory build, staged, before the rename           dir name
``atomic_write``       any atomic file write, temp file written, before rename  file name
``seqkd_output``       seqKD: after a teacher response is appended to the cache hit count
``eval_output``        eval: after a prediction line is appended                hit count
``replace``            --overwrite: an old entry moved aside (``DONE`` first)   entry name
=====================  ======================================================  ==========
"""

from __future__ import annotations

import os
import signal
import sys

#: The environment variable naming the fault point.
ENV_VAR = "KDLAB_FAULT"

_spec: tuple[str, str | None] | None = None
_hits: dict[str, int] = {}


def _parse(text: str | None) -> tuple[str, str | None] | None:
    if not text or not text.strip():
        return None
    point, sep, when = text.strip().partition(":")
    return point.strip(), (when.strip() if sep else None)


def configure(text: str | None = None) -> None:
    """(Re)read the fault spec: ``text`` or, when None, ``$KDLAB_FAULT``; reset hit counts."""
    global _spec
    _spec = _parse(os.environ.get(ENV_VAR) if text is None else text)
    _hits.clear()


def maybe_fault(point: str, value: object = None) -> None:
    """Kill this process with SIGKILL if ``KDLAB_FAULT`` selects this call (else no-op)."""
    if _spec is None or _spec[0] != point:
        return
    when = _spec[1]
    if value is not None and when is not None:
        fire = str(value) == when
    else:
        _hits[point] = _hits.get(point, 0) + 1
        fire = when is None or str(_hits[point]) == when
    if fire:
        _kill(point if value is None else f"{point}:{value}")


def _kill(where: str) -> None:
    sys.stderr.write(f"kdlab: injected fault at {where}: SIGKILL\n")
    sys.stderr.flush()
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # pragma: no cover - platforms without SIGKILL


configure()
