"""softprompt: soft prompt tuning experiments on frozen transformers (Lester et al., 2021).

The Python API (`run`, `report`, `load_run`, `PromptBank`) loads on first use: `import softprompt` stays cheap, where
torch, transformers and the training code take seconds to import.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from softprompt.errors import UserError

__version__ = "0.1.0"
__all__ = ["LoadedRun", "PromptBank", "UserError", "load_run", "report", "run"]

# exported name -> the module defining it
_LAZY = {
    "run": "softprompt.api",
    "load_run": "softprompt.api",
    "LoadedRun": "softprompt.api",
    "PromptBank": "softprompt.prompt_bank",
}

if TYPE_CHECKING:
    from softprompt.api import LoadedRun, load_run, report, run
    from softprompt.prompt_bank import PromptBank


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """`softprompt.report` is the report function though the module softprompt.report shares its name: Python sets
    a package's attribute to each submodule it loads, and here that attribute stays the function."""

    @property
    def report(self):
        return importlib.import_module("softprompt.api").report

    @report.setter
    def report(self, module: types.ModuleType) -> None:
        """The import system binding the submodule softprompt.report: `from softprompt.report import ...` still finds
        the module (in sys.modules)."""


sys.modules[__name__].__class__ = _Package
