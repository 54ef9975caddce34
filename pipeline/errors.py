"""One exception type for bad input, so the CLI can print a single line naming file and problem."""

from __future__ import annotations

from os import PathLike


class PipelineError(Exception):
    """Bad input or configuration: ``<path>: <problem>``, printed as one line by the CLI."""

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the cause text held
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")
