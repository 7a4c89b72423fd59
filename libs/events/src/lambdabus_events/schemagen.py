"""Generate the JSON Schemas of the lifecycle catalog into `schemas/events/`, or check for drift.

    python -m lambdabus_events.schemagen [--check] [--root SCHEMAS_DIR]

`render_event_schemas` is pure; the CLI writes its output (removing stale files) or, with
`--check`, exits 1 and names every file that differs from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from lambdabus_events.catalog import CATALOG, LifecycleEvent, schema_url

EVENTS_DIR: Final = "events"
INDEX_FILE: Final = f"{EVENTS_DIR}/index.json"
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
HINT: Final = "run `make schemas` to regenerate them"


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def event_schema(cls: type[LifecycleEvent]) -> dict[str, Any]:
    """The JSON Schema of one catalog type, as a whole structured-mode CloudEvent."""
    schema = cls.model_json_schema()
    # Our producers always send every attribute (defaults included), and `type` is what
    # consumers dispatch on, so the wire schema requires them all; but the optional extension
    # attributes (default None, e.g. the actor), which are left out when absent.
    optional = {name for name, field in cls.model_fields.items() if field.default is None}
    schema["required"] = [name for name in schema["properties"] if name not in optional]
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_url(cls.EVENT_TYPE), **schema}


def render_event_schemas() -> dict[str, str]:
    """Every generated file: path relative to `schemas/` → its text."""
    files = {f"{EVENTS_DIR}/{cls.EVENT_TYPE}.json": _dump(event_schema(cls)) for cls in CATALOG}
    index = {"types": {cls.EVENT_TYPE: f"{cls.EVENT_TYPE}.json" for cls in CATALOG}}
    files[INDEX_FILE] = _dump(index)
    return files


Drift = tuple[str, str]  # (missing | stale | different, path relative to the schemas dir)


def drift(root: Path, expected: dict[str, str]) -> list[Drift]:
    """How the schemas dir `root` differs from `expected`, sorted by path."""
    on_disk = {path.relative_to(root).as_posix() for path in (root / EVENTS_DIR).glob("*.json")}
    found: list[Drift] = [("stale", rel) for rel in on_disk - expected.keys()]
    for rel, text in expected.items():
        if rel not in on_disk:
            found.append(("missing", rel))
        elif (root / rel).read_text(encoding="utf-8") != text:
            found.append(("different", rel))
    return sorted(found, key=lambda item: item[1])


def write(root: Path, expected: dict[str, str]) -> list[Drift]:
    """Make `root` match `expected` (write what is missing or different, delete what is stale)."""
    changes = drift(root, expected)
    (root / EVENTS_DIR).mkdir(parents=True, exist_ok=True)
    for kind, rel in changes:
        if kind == "stale":
            (root / rel).unlink()
        else:
            (root / rel).write_text(expected[rel], encoding="utf-8")
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lambdabus_events.schemagen",
        description="Generate the lifecycle CloudEvent JSON Schemas into <root>/events/.",
    )
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 if any file is out of date"
    )
    parser.add_argument(
        "--root", type=Path, default=Path("schemas"), help="schemas directory (default: ./schemas)"
    )
    args = parser.parse_args(argv)
    root: Path = args.root
    expected = render_event_schemas()
    if args.check:
        problems = drift(root, expected)
        for kind, rel in problems:
            print(f"{kind}: {root / rel}", file=sys.stderr)
        if problems:
            print(f"event schemas are out of date; {HINT}", file=sys.stderr)
            return 1
        return 0
    for kind, rel in write(root, expected):
        print(f"{'deleted' if kind == 'stale' else 'wrote'}: {root / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
