"""Package-internal text formatting shared by the tables (Results, Audit, the experiment report)."""

from __future__ import annotations

#: What a table cell shows for a rate that was not measured (no rows for it, or no model run).
#: "n/a" rather than "-": a dash reads as a minus sign or an empty eps column in the same tables.
MISSING = "n/a"


def pct(value: float | None) -> str:
    """A rate in [0, 1] as a percentage with one decimal (``0.9234`` -> ``"92.3%"``); ``None``
    (not measured) as :data:`MISSING`."""
    return MISSING if value is None else f"{100 * value:.1f}%"
