"""Tables and progress bars: rich when it is installed (extra ``cli``), plain text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["format_table", "print_table", "progress"]


def _have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain-text table with aligned columns (used when rich is missing, and in files); a line
    break inside a header or cell (meant for rich's wrapped headers) becomes a space."""
    cells = [[" ".join(str(c).split("\n")) for c in columns]] + [
        ["" if v is None else " ".join(str(v).split("\n")) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None, file=None
) -> None:
    """Print a table to ``file`` (stdout): a rich table if rich is installed and ``file`` is a
    terminal, plain aligned text otherwise (piped output stays parseable); names are never cut."""
    rows = list(rows)
    file = sys.stdout if file is None else file
    if _have_rich() and getattr(file, "isatty", lambda: False)():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(str(c), overflow="fold")
        for r in rows:
            table.add_row(*["" if v is None else str(v) for v in r])
        Console(file=file, width=max(100, Console(file=file).width)).print(table)
        return
    if title:
        print(title, file=file)
    print(format_table(columns, rows), file=file)


def progress(
    items: Iterable[T], description: str = "", total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate ``items`` with a progress bar on stderr (rich if installed, else a counter)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if _have_rich():
        from rich.console import Console
        from rich.progress import track

        yield from track(
            items, description=description, total=total, console=Console(stderr=True),
            transient=True,
        )
        return
    for i, item in enumerate(items, 1):
        yield item
        print(f"\r{description} {i}/{total if total is not None else '?'}", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
