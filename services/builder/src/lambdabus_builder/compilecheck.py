"""Run by a function's own interpreter (`<env>/bin/python -I compilecheck.py <code_dir>
[<entrypoint>]`): compile every `.py` file under the code directory, writing the bytecode caches
that the read-only code directory could not get at import time, check that the entry point binds
`main` at its top level (without running it), and print the first error as one JSON line.

Standard library only, and no import of the builder: it runs outside the builder's environment.
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import sys


def check(root: str) -> dict[str, object] | None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(dirpath, filename)
            try:
                py_compile.compile(path, doraise=True)
            except py_compile.PyCompileError as exc:
                error = exc.exc_value
                return {
                    "file": os.path.relpath(path, root),
                    "line": getattr(error, "lineno", None),
                    "offset": getattr(error, "offset", None),
                    "message": getattr(error, "msg", None) or str(error),
                    "text": getattr(error, "text", None),
                    "error": exc.exc_type_name,
                }
    return None


def defines_main(tree: ast.Module) -> bool:
    """Whether a module binds `main` anywhere (def, class, assignment, import), or may (a star
    import). Permissive on purpose: a false "yes" fails at the first start, as before."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == "main":
                return True
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if any(
                a.name == "*" or (a.asname or a.name.split(".")[0]) == "main" for a in node.names
            ):
                return True
        elif isinstance(node, ast.Name) and node.id == "main" and isinstance(node.ctx, ast.Store):
            return True
    return False


def top_level_names(tree: ast.Module) -> tuple[list[str], bool]:
    """The public names a module binds at its top level (what `module.<name>` can find), and
    whether it has a star import (which may bind more)."""
    names: list[str] = []
    star = False

    def bind(target: ast.expr) -> None:
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                bind(element)

    def visit(body: list[ast.stmt]) -> None:
        nonlocal star
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    bind(target)
            elif isinstance(node, ast.AnnAssign | ast.AugAssign):
                bind(node.target)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":
                        star = True
                    else:
                        names.append(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.If | ast.Try | ast.With):  # conditional definitions
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    public = sorted({name for name in names if not name.startswith("_")})
    return public, star


def check_handler(root: str, entrypoint: str, function: str) -> dict[str, object] | None:
    """Kubeless's `<module>.<function>`: the module must bind `function` at its top level."""
    with open(os.path.join(root, entrypoint), "rb") as file:
        tree = ast.parse(file.read(), entrypoint)
    names, star = top_level_names(tree)
    if function in names or star:
        return None
    module = entrypoint[: -len(".py")].replace("/", ".")
    exported = ", ".join(names) if names else "nothing"
    return {
        "file": entrypoint,
        "line": None,
        "offset": None,
        "message": f"the handler {module}.{function} does not exist: module {module} "
        f"({entrypoint}) defines no {function!r}; it exports: {exported}",
        "text": None,
        "error": "NoHandler",
        "exports": names,
    }


def check_entrypoint(root: str, entrypoint: str) -> dict[str, object] | None:
    with open(os.path.join(root, entrypoint), "rb") as file:
        tree = ast.parse(file.read(), entrypoint)
    if defines_main(tree):
        return None
    return {
        "file": entrypoint,
        "line": None,
        "offset": None,
        "message": "defines no main function: the runtime calls `main`",
        "text": None,
        "error": "NoHandler",
    }


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 4):
        print("usage: compilecheck.py CODE_DIR [ENTRYPOINT [FUNCTION]]", file=sys.stderr)
        return 2
    error = check(argv[1])
    if error is None and len(argv) == 3:
        error = check_entrypoint(argv[1], argv[2])
    elif error is None and len(argv) == 4:
        error = (
            check_entrypoint(argv[1], argv[2])
            if argv[3] == "main"
            else check_handler(argv[1], argv[2], argv[3])
        )
    if error is None:
        return 0
    print(json.dumps(error))
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
