"""Intake limits, checked after parsing so each error names the limit and its setting."""

from __future__ import annotations

from collections.abc import Sequence

from service.errors import Problem
from workers.ml.specs import Item


def check_count(field: str, count: int, limit: int, setting: str) -> None:
    if count > limit:
        raise Problem(
            422,
            "too-many-items",
            "Too many items",
            f"{field} has {count} items; the limit is {limit} ({setting})",
            field=field,
            limit=limit,
        )


def check_item_bytes(field: str, items: Sequence[Item], limit: int) -> None:
    for index, item in enumerate(items):
        size = sum(len(v.encode()) for v in item.plain().values())
        if size > limit:
            raise Problem(
                422,
                "item-too-large",
                "Item too large",
                f"{field}[{index}] is {size} bytes of text; the limit is {limit} bytes per "
                "item (MAX_ITEM_BYTES): split it into several items",
                field=f"{field}.{index}",
                limit=limit,
            )
