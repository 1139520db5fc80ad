"""Rendering of a :class:`~relucap_plugin.results.Results` table: the summary and agreement
tables as text, Markdown or rich, the notes under them, and the robust accuracy plot."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from .._console import format_table, print_table
from .._files import save_figure
from .._format import markdown_table, pct

if TYPE_CHECKING:
    from . import Results


def _fmt_eps(eps: float) -> str:
    """``eps`` as people write it: ``0.3``, or ``8/255`` for a budget in 255ths with no short
    decimal form."""
    short, k = f"{eps:g}", round(eps * 255)
    return f"{k}/255" if len(short) > 6 and k > 0 and math.isclose(eps * 255, k, rel_tol=1e-9) else short


COLUMNS = ("attack", "eps", "robust acc", "n", "violations", "failed", "mean norm", "time (s)")


def summary_cells(results: Results) -> list[list[str]]:
    cells = [
        ["clean", "-", pct(results.clean_accuracy()), str(len(results.samples)), "", "", "", ""]
    ]
    for s in results.summary():
        cells.append(
            [
                s["attack"] + (" (conditional)" if s["conditional"] else ""),
                _fmt_eps(s["eps"]),
                pct(s["robust_accuracy"]),
                str(s["n"]),
                "" if s["violations"] is None else str(s["violations"]),
                "" if s["failed"] is None else str(s["failed"]),
                "" if s["mean_norm"] is None else f"{s['mean_norm']:.4g}",
                "" if s["time"] is None else f"{s['time']:.2f}",
            ]
        )
    return cells


def agreement_cells(results: Results) -> tuple[list[str], list[list[str]]]:
    entries = results.agreement()
    libs = sorted({lib for e in entries for lib in e["accuracy"]})
    columns = ["attack family", "eps", *libs, "max gap (pts)", "disagreements"]
    cells = [
        [
            e["family"],
            _fmt_eps(e["eps"]),
            *(pct(e["accuracy"].get(lib)) for lib in libs),
            f"{e['max_gap']:.1f}",
            f"{e['disagreements']}/{e['n_common']}",
        ]
        for e in entries
    ]
    return columns, cells


def title(results: Results) -> str:
    tm = results.metadata.get("threat_model") or {}
    norm = f", {tm['norm']}" if tm.get("norm") else ""
    return f"{results.metadata.get('model') or 'model'}{norm}: {len(results.samples)} samples"


def notes(results: Results) -> list[str]:
    notes = []
    v, f, m = results.violations(), results.failed(), results.missing()
    if v:
        notes.append(
            f"{len(v)} row(s) failed verification and count as not robust, e.g. "
            f"{v[0]['attack']} sample {v[0]['sample']}: {v[0]['reason']}"
        )
    if f:
        notes.append(
            f"{len(f)} row(s) failed (the attack raised), e.g. {f[0]['attack']} "
            f"sample {f[0]['sample']}: {f[0]['reason']}"
        )
    for eps in results.eps:
        cert, worst = results.certified(eps), results.worst_case(eps)
        if cert is not None and worst is not None:
            notes.append(
                f"eps {_fmt_eps(eps)}: certified {pct(cert)} <= robust accuracy <= "
                f"{pct(worst)} (worst case over attacks)"
            )
    if results.schedule != "full":
        notes.append(
            f"{results.schedule} schedule: each attack ran only on the samples no earlier attack "
            "had broken at that eps (rows not_needed otherwise; under the audit schedule "
            "BPDA, transfer and black-box attacks ran on every survivor of the white-box "
            "attacks); an attack marked (conditional) "
            "shows its robust accuracy on the samples it ran on (n: the clean-correct samples it "
            "ran on or whose example of a smaller eps it reused), not on all samples; the worst case is exact; agreement across "
            "libraries is n/a (evaluate with schedule='full' for per-attack and agreement "
            "tables)")
    if m:
        notes.append(
            f"{len(m)} (sample, attack, eps) row(s) have no outcome; Results.missing() "
            "lists them (resume the run to fill them)"
        )
    return notes


def table(results: Results, markdown: bool = False) -> str:
    """The summary (and agreement) tables and notes as text, or as Markdown."""
    fmt = markdown_table if markdown else format_table
    parts = [title(results), fmt(COLUMNS, summary_cells(results))]
    columns, cells = agreement_cells(results)
    if cells:
        parts += ["Agreement across libraries", fmt(columns, cells)]
    parts += notes(results)
    return "\n\n".join(parts) + "\n"


def print_tables(results: Results, file=None) -> None:
    """Print the summary and agreement tables (rich if installed) and the notes."""
    print_table(COLUMNS, summary_cells(results), title=title(results), file=file)
    columns, cells = agreement_cells(results)
    if cells:
        print_table(columns, cells, title="Agreement across libraries", file=file)
    for note in notes(results):
        print(note, file=file)


def plot(results: Results, path: str | os.PathLike | None = None):
    """Robust accuracy vs eps, one line per attack plus the worst case; saved as PNG to
    ``path`` if given. Returns the matplotlib ``Figure`` (drawn with Agg; pyplot untouched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("Results.plot() needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    eps = results.eps
    for attack in results.attacks:
        pts = [(e, results.robust_accuracy(attack, e)) for e in eps]
        pts = [(e, 100 * a) for e, a in pts if a is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=attack)
    if len(results.attacks) > 1:
        pts = [(e, results.worst_case(e)) for e in eps]
        pts = [(e, 100 * a) for e, a in pts if a is not None]
        if pts:
            ax.plot(*zip(*pts), "k--", marker="s", label="worst case")
    clean = results.clean_accuracy()
    if clean is not None:
        ax.axhline(100 * clean, color="grey", linestyle=":", label="clean")
    tm = results.metadata.get("threat_model") or {}
    ax.set_xlabel(f"eps ({tm.get('norm', 'norm')})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title(results))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if path is not None:
        save_figure(fig, path, dpi=120)
    return fig
