"""Loading ``module:app`` (or ``module:factory()``) the way uvicorn does, with clear errors."""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from rabbitflow.app import App
from rabbitflow.errors import ConfigurationError, ImportStringError, UserImportError

__all__ = ["ImportStringError", "UserImportError", "load_app"]


def load_app(target: str) -> App:
    """Import ``package.module:attr``; call it when written ``attr()`` (a factory)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ImportStringError(
            f'import string {target!r} must be "module:attribute", e.g. "myservice.main:app"'
        )
    call = attr.endswith("()")
    attr = attr.removesuffix("()")
    module = _import(module_name)
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            apps = [name for name, value in vars(module).items() if isinstance(value, App)]
            hint = f"; it has {', '.join(apps)}" if apps else ""
            raise ImportStringError(f"module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    # A function is a factory even without "()"; a class is never called implicitly: it is
    # more likely a model or a handler written by mistake than an App subclass to build.
    if call and not callable(obj):
        raise ImportStringError(f"{target!r}: {describe(obj)} cannot be called")
    if callable(obj) and (call or inspect.isfunction(obj) or inspect.ismethod(obj)):
        obj = _call_factory(module_name, obj)
        if not isinstance(obj, App):
            raise ImportStringError(f"{target!r} returned {describe(obj)}, not a rabbitflow App")
    if not isinstance(obj, App):
        raise ImportStringError(
            f"{target!r} is {describe(obj)}, not a rabbitflow App "
            '(point at the object created with App(...), e.g. "myservice.main:app")'
        )
    return obj


def describe(obj: object) -> str:
    """What ``obj`` is, for a user who expected an App: ``the class Order (a pydantic model)``."""
    if inspect.ismodule(obj):
        return f"the module {obj.__name__!r}"
    if isinstance(obj, type):
        kinds = {"BaseModel": "a pydantic model", "Exception": "an exception class"}
        kind = next((kinds[base.__name__] for base in obj.__mro__ if base.__name__ in kinds), "")
        return f"the class {obj.__name__}" + (f" ({kind})" if kind else "")
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return f"the function {obj.__name__}()"
    if obj is None:
        return "None"
    return f"{_article(type(obj).__name__)} {type(obj).__name__}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _call_factory(module_name: str, factory: Callable[[], object]) -> object:
    # The factory is the user's code: what it raises is shown as such, like an import error.
    try:
        return factory()
    except Exception:
        raise UserImportError(module_name, traceback.format_exc()) from None


def _import(module_name: str) -> object:
    # Like `python -m`, the current directory is importable.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ImportStringError(
                f"could not import module {module_name!r} (run from the directory that "
                "contains it, or install it)"
            ) from None
        raise UserImportError(module_name, traceback.format_exc()) from None
    except Exception:
        raise UserImportError(module_name, traceback.format_exc()) from None


def exception_types(names: tuple[str, ...], where: str) -> tuple[type[BaseException], ...]:
    """Import ``retry_on`` / ``dead_letter_on`` names of the topology (``"httpx.HTTPError"``)."""
    found: list[type[BaseException]] = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name or "builtins"), attr)
        except (ImportError, AttributeError, ValueError):
            raise ConfigurationError(f"{where}: cannot import exception {name!r}") from None
        if not (isinstance(obj, type) and issubclass(obj, BaseException)):
            raise ConfigurationError(f"{where}: {name!r} is not an exception class")
        found.append(obj)
    return tuple(found)
