"""Exceptions a caller may want to catch."""


class PipelineError(Exception):
    """A run cannot go on (too many failed fields, inconsistent store, ...)."""


class InputError(PipelineError, ValueError):
    """User input (plate map, image folder, config) is wrong.

    The message lists every problem found, each naming the file or column and the fix.
    """

    def __init__(self, problems: list[str] | str, *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{head}{len(self.problems)} problems found:\n{lines}"
        super().__init__(message)


def collect_input_errors(errors: list[InputError]) -> InputError:
    """Merge several input errors into one listing every problem with its source."""
    problems = [
        f"{error.source}: {problem}" if error.source else problem
        for error in errors
        for problem in error.problems
    ]
    return InputError(problems)
