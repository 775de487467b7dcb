"""alignforge's own exception types.

Every error a user can cause (bad data, bad config, bad model path) is raised as an
:class:`AlignforgeError` subclass with a message that names *where* the problem is,
so the CLI can print it without a traceback and exit non-zero.
"""

from __future__ import annotations


class AlignforgeError(Exception):
    """Base class for every error alignforge raises on purpose."""


class ConfigError(AlignforgeError):
    """A config file or a ``key=value`` override is invalid."""


class ModelError(AlignforgeError):
    """A model or tokenizer could not be found or loaded."""


class DataError(AlignforgeError):
    """A data record is invalid.

    ``file``, ``line`` (1-based; for JSON arrays the 1-based index of the record) and
    ``field`` say where; ``str(err)`` is ``"FILE:LINE: field 'FIELD': REASON"``.
    """

    def __init__(self, reason: str, file: str | None = None, line: int | None = None, field: str | None = None):
        self.reason = reason
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        elif self.line is not None:
            where = f"line {self.line}: "
        fld = f"field '{self.field}': " if self.field else ""
        return f"{where}{fld}{self.reason}"


class TrainingError(AlignforgeError):
    """Training cannot go on (e.g. a non-finite loss)."""


class TrainingInterrupted(TrainingError):
    """SIGINT: a checkpoint was saved and the run stopped (exit code 130)."""
