"""The benchmarks' one Markdown table printer: a header row, the ``|---|`` rule, one row per item.

Cells are written with ``str``; a ``|`` inside a cell is escaped (``\\|``) so that it stays in its
column, as in the bench's ``results.md``.

    >>> print(markdown_table(["attack", "ASR"], [["badnet", "97.61"]]))
    | attack | ASR |
    |---|---|
    | badnet | 97.61 |
"""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_row(cells: Iterable) -> str:
    """One table row: ``| a | b |``."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def markdown_table(headers: Sequence, rows: Iterable[Iterable]) -> str:
    """The header row, the rule and the rows, joined by newlines (no newline at the end)."""
    return "\n".join([markdown_row(headers), "|" + "---|" * len(headers), *map(markdown_row, rows)])
