"""Names of namespaces, functions and triggers: RFC 1035 labels, checked before they reach NATS."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
LABEL_MAX = 63
_LABEL = re.compile(LABEL_PATTERN)

Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN, min_length=1, max_length=LABEL_MAX)]


def label_problem(value: str) -> str | None:
    """Say what is wrong with `value` as an RFC 1035 label, or None if it is one."""
    if not value:
        return "must not be empty"
    if len(value) > LABEL_MAX:
        return f"must be at most {LABEL_MAX} characters (got {len(value)})"
    if _LABEL.fullmatch(value) is None:
        return (
            "must be an RFC 1035 label: lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return None


def is_label(value: str) -> bool:
    return label_problem(value) is None
