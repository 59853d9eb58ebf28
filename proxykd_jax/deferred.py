"""Package names that load with their module on first use (a PEP 562 module `__getattr__`).

A package's `__init__` that imported its heavy modules (flax, optax, orbax, grain) would make every
config check and `proxykd <stage> --help` pay for them, since the config groups' defaults live in
light modules of the same packages (`train/config.py`, `models/config.py`, ...).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable


def names_of(package: str, modules: dict[str, tuple[str, ...]]) -> Callable[[str], object]:
    """`__getattr__` for `package`: each name in `modules` (submodule -> the names it defines) is imported from its
    submodule on first use and kept on the package, and a submodule's name imports the submodule (`package.sub.f`
    worked while the package's `__init__` imported every submodule); any other name is no attribute."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            setattr(sys.modules[package], name, value)
            return value
        if (
            name.isidentifier()
            and not name.startswith("__")
            and importlib.util.find_spec(f"{package}.{name}") is not None
        ):
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
