"""One exception hierarchy; the CLI turns each into one clear line and an exit status."""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class FactoryError(Exception):
    """Base error: a message for the user, an optional hint how to fix it, an exit status."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)  # both survive pickling (errors from helper processes)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(FactoryError):
    """Bad usage, configuration or image definition: nothing was started."""

    exit_code = EXIT_USAGE


class BuildError(FactoryError):
    """The build ran and failed."""

    exit_code = EXIT_FAILED


class Interrupted(FactoryError):
    """The build was stopped by SIGINT or SIGTERM; everything was cleaned up."""

    exit_code = EXIT_INTERRUPTED
