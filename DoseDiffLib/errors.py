"""One exception type for every problem a user can fix.

Physicists see these messages in the CLI and the Slicer GUI, so each one names what
is wrong with the input and what to do about it, instead of a stack trace.
"""
from __future__ import annotations

import logging


class DoseDiffError(ValueError):
    """An input or configuration problem, described with its fix."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


class Cancelled(RuntimeError):
    """Raised when the progress callback asks to stop."""


def warn(warnings: list[str], message: str, logger: str = "DoseDiffLib") -> None:
    """Log a warning and keep it for the user-facing report (CLI, GUI, model info)."""
    logging.getLogger(logger).warning(message)
    warnings.append(message)
