"""User-facing errors.

A :class:`KdlabError` is a problem with what the user gave us (a config, a data file, a
command line, a model path). The CLI prints it as one line on stderr and exits with code 2,
without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class KdlabError(Exception):
    """A user-facing error: printed as one line, exit code 2."""

    exit_code = 2

    def one_line(self) -> str:
        """The message folded onto a single line."""
        return " ".join(str(self).split())


class ConfigError(KdlabError):
    """An invalid configuration: unknown key, wrong type, out-of-range value."""


class DataError(KdlabError):
    """An invalid data file or record."""


class ModelError(KdlabError):
    """A model, tokenizer or adapter that cannot be loaded or does not fit."""


class RunDirError(KdlabError):
    """A run directory that exists, is incomplete, or cannot be used."""


class DamagedFileError(KdlabError, ValueError):
    """A file kdlab wrote earlier that cannot be read back (a damaged line, a truncated
    checkpoint). A ``ValueError`` too, as the JSON and YAML decoders' errors are."""
