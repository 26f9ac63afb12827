"""What the `davir` command reports as a user's mistake rather than a bug.

`UserError` (a `ValueError`) is raised by library code for input a person can fix: a missing or
unreadable file, an unwritable output directory, a run directory in use, a config value. The
command prints such errors as one line, `davir CMD: error: ...`, and exits with status 2; any
other exception is a bug and keeps its traceback (`davir --debug` shows it for every error).
`ValueError` (e.g. `ConfigError`, `DataError`), `OSError` and `yaml.YAMLError` are treated the
same way, so existing library code signals user errors without depending on this module.
"""

from __future__ import annotations

import yaml


class UserError(ValueError):
    """A mistake in the user's input (files, directories, config); the message names it."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types the command reports in one line (exit 2) instead of a traceback."""

    return (UserError, ValueError, OSError, yaml.YAMLError)


def describe(e: BaseException) -> str:
    """One line for a user error: an OSError as `PATH: reason`, anything else its message."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            msg += f" (-> {e.filename2})"
    else:
        msg = str(e) or type(e).__name__
    # One line: YAML and some library messages span several.
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())
