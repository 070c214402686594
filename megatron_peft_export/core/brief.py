"""Values that came from someone else's file: described for error messages at a bounded cost (`brief`), and
refused when walking them would not end (`check_tree`).

`f"{value!r:.40}"` builds the whole repr before cutting it: for a pickled list that holds the same list 32 times,
32 levels deep (800 bytes of pickle), that is 32^12 items and never ends; a deeply nested one raises RecursionError,
and an integer of more than 4300 digits raises ValueError. `brief` looks at most `DEPTH` levels deep and at most
`ITEMS` items of each container, prints only the types of objects that are not plain data, and cuts long texts and
numbers before converting them, so its cost is bounded whatever the value is.
"""

from __future__ import annotations

import argparse
import types
from collections import OrderedDict
from typing import Any

DEPTH = 3
ITEMS = 6
_PLAIN = (bool, float, complex, type(None))


def _short(value: Any, depth: int) -> str:
    kind = type(value)
    if kind is int:
        return repr(value) if value.bit_length() <= 128 else f"<an integer of {value.bit_length()} bits>"
    if kind in _PLAIN:
        return repr(value)
    if kind in (str, bytes, bytearray):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if kind in (list, tuple, set, frozenset, dict):
        if depth >= DEPTH:
            return f"<{kind.__name__} of {len(value)}>"
        items = []
        for n, item in enumerate(value.items() if kind is dict else value):
            if n == ITEMS:
                items.append("...")
                break
            items.append(
                f"{_short(item[0], depth + 1)}: {_short(item[1], depth + 1)}"
                if kind is dict
                else _short(item, depth + 1)
            )
        if kind is tuple and len(items) == 1:
            items.append("")
        if kind in (set, frozenset) and not items:
            return f"{kind.__name__}()"
        opening, closing = {list: "[]", tuple: "()"}.get(kind, "{}")
        return opening + ", ".join(items).rstrip() + closing
    return f"<{kind.__name__}>"


def brief(value: Any, limit: int = 60) -> str:
    """At most `limit` characters describing `value` (a repr for small plain data)."""
    text = _short(value, 0)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_DEPTH = 100
"""Nesting of a loaded file's data (lists, dicts, tuples, sets, argument namespaces)."""
MAX_INT_BITS = 1024
_WALKED = (list, tuple, dict, OrderedDict, set, frozenset)


def check_tree(root: Any, max_items: int) -> None:
    """Refuse what the readers of a loaded file cannot walk at a bounded cost: nesting past MAX_DEPTH, more than
    `max_items` items counted through shared references (a list holding one list 32 times, 12 levels deep, is 800
    bytes of pickle and 32^12 items to anything that walks it), integers of more than MAX_INT_BITS bits (which
    str() refuses). Walks without recursion; argument namespaces are walked, tensors and opaque objects are not."""
    pending, items = [(root, 0)], 0
    while pending:
        value, depth = pending.pop()
        kind = type(value)
        if kind is int and value.bit_length() > MAX_INT_BITS:
            raise ValueError(f"an integer of {value.bit_length()} bits (at most {MAX_INT_BITS})")
        if kind in (argparse.Namespace, types.SimpleNamespace):
            value, kind = vars(value), dict
        if kind not in _WALKED:
            continue
        items += len(value)
        if depth >= MAX_DEPTH or items > max_items:
            raise ValueError(
                f"nested deeper than {MAX_DEPTH} levels"
                if depth >= MAX_DEPTH
                else f"more than {max_items} items counted through shared references"
            )
        children = value.items() if kind in (dict, OrderedDict) else value
        for child in children:
            pending.append((child, depth + 1))
