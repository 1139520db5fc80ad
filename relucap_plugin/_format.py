"""Package-internal text formatting shared by the tables (Results, Audit, the experiment report)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: What a table cell shows for a rate that was not measured (no rows for it, or no model run).
#: "n/a" rather than "-": a dash reads as a minus sign or an empty eps column in the same tables.
MISSING = "n/a"


def pct(value: float | None) -> str:
    """A rate in [0, 1] as a percentage with one decimal (``0.9234`` -> ``"92.3%"``); ``None``
    (not measured) as :data:`MISSING`."""
    return MISSING if value is None else f"{100 * value:.1f}%"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; ``None`` cells empty, ``|`` in cells escaped."""
    esc = [[("" if v is None else str(v)).replace("|", "\\|") for v in r] for r in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def short_repr(value: Any, limit: int = 80) -> str:
    """``value`` as an error message shows what the user passed: arrays and tensors by type, dtype
    and shape (never their values), anything else as its ``repr`` cut to ``limit`` characters."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__}(dtype={value.dtype}, shape={tuple(shape)})"
    if isinstance(value, (tuple, list)) and any(hasattr(v, "shape") for v in value[:3]):
        inner = ", ".join(short_repr(v, limit) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"
