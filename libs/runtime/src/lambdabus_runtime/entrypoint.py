"""Loading a function's entry point and telling its style.

`lambda_main.py` is LUNA style, `main(request)`; any other file (`handler.py`) is
Kyma/Kubeless style, `main(event, context)`. Either may be sync or async.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

Style = Literal["luna", "kyma"]

LUNA_ENTRYPOINT = "lambda_main.py"


class LoadError(Exception):
    """The entry point cannot be loaded for a reason other than an exception in its code."""


class Function:
    """A loaded entry point."""

    __slots__ = ("is_async", "main", "style")

    def __init__(self, main: Callable[..., Any], style: Style, is_async: bool) -> None:
        self.main = main
        self.style = style
        self.is_async = is_async


def style_of(entrypoint: str) -> Style:
    return "luna" if os.path.basename(entrypoint) == LUNA_ENTRYPOINT else "kyma"


def is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a class instance with async __call__
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def load(code_dir: str, entrypoint: str, function: str = "main") -> Function:
    """Put `code_dir` first on sys.path and import `entrypoint` (a path inside it); the
    function called is `function` (Kubeless's `--handler helloget.foo` calls `foo`).

    A module below the root (`pkg/mod.py`, handler `pkg.mod.fn`) is imported by its dotted
    name, so its package and relative imports work. Exceptions raised by the module's own code
    propagate unchanged; `LoadError` says what else is wrong (no such file, no such function).
    """
    code_dir = os.path.abspath(code_dir)
    path = os.path.join(code_dir, entrypoint)
    if not os.path.isfile(path):
        raise LoadError(f"the entry point {entrypoint!r} is not a file in {code_dir}")
    sys.path.insert(0, code_dir)
    if "/" in entrypoint:
        module = importlib.import_module(os.path.splitext(entrypoint)[0].replace("/", "."))
    else:
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise LoadError(f"the entry point {entrypoint!r} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    main = getattr(module, function, None)
    if not callable(main):
        exported = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise LoadError(
            f"{entrypoint} defines no {function} function"
            + (f"; its functions: {', '.join(exported)}" if exported else "")
        )
    return Function(main, style_of(entrypoint), is_async_callable(main))
