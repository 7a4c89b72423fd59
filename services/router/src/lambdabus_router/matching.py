"""Which events a trigger takes: its filter against an event's context attributes. Pure.

A filter maps attribute names (`type`, `source`, `subject`, or an extension) to values that
match exactly, or by prefix when they end in `*`. Every key must match; an attribute the event
does not carry matches nothing. The EVENTS subject filter already narrows by `type` where it
can; checking every key again here costs a string comparison and keeps one rule in one place.
"""

from __future__ import annotations

from collections.abc import Mapping


def match_value(value: str, pattern: str) -> bool:
    """`value` against one filter value: exact, or a prefix when `pattern` ends in `*`."""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def match_trigger(event_attrs: Mapping[str, str], filter: Mapping[str, str]) -> bool:
    """True when every key of `filter` matches the event's attribute of that name."""
    for name, pattern in filter.items():
        value = event_attrs.get(name)
        if value is None or not match_value(value, pattern):
            return False
    return True
