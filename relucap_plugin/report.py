"""The Markdown report of an experiment run: the table, every setting, and PNG plots.

:func:`write_report` writes ``report.md``, ``summary.json`` and three plots (drawn with
matplotlib's Agg canvas; pyplot is never touched) into the run's folder. The report says plainly
that its numbers are this run's own, not figures of arXiv 2405.03777.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from ._format import markdown_table, pct
from ._files import atomic_write, check_target, save_figure
from .threat import STEP_SIZE_FACTOR

if TYPE_CHECKING:  # pragma: no cover
    from .experiment import ExperimentResult

__all__ = ["PLOTS", "plot_pgd_vs_worst_case", "plot_robust_accuracy", "write_report"]

#: File names of the plots, in report order.
PLOTS = {
    "robust_accuracy": "robust_accuracy_vs_eps.png",
    "pgd_vs_worst_case": "pgd_vs_worst_case.png",
    "growth": "perturbation_growth.png",
}


def _figure(size: tuple[float, float]):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the report's plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=size, layout="constrained")


def plot_robust_accuracy(result: ExperimentResult, path: str | os.PathLike | None = None):
    """Robust accuracy vs eps, one line per model: PGD (torchattacks) left, the per-sample
    worst case over every attack right. Returns the ``Figure``; saved as PNG to ``path``."""
    fig = _figure((10, 4))
    eps = list(result.config.eps)
    panels = (("PGD (torchattacks)", lambda m: m.pgd["torchattacks"]),
              ("worst case over all attacks", lambda m: m.worst_case))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (title, curve) in zip(axes, panels):
        for m in result.models:
            values = curve(m)
            pts = [(0.0, 100 * m.clean)] + [(e, 100 * values[e]) for e in eps
                                            if values.get(e) is not None]
            ax.plot(*zip(*pts), marker="o", label=m.name,
                    linestyle="--" if m.spec.training != "standard" else "-")
        ax.set_title(title)
        ax.set_xlabel("eps (L-inf)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("robust accuracy (%)")
    axes[0].set_ylim(-2, 102)
    axes[1].legend(fontsize="x-small", loc="upper right")
    if path is not None:
        save_figure(fig, path, dpi=90)
    return fig


def plot_pgd_vs_worst_case(result: ExperimentResult, path: str | os.PathLike | None = None):
    """Bars at the headline eps: PGD through each library next to the worst case, per model.
    A worst case far below PGD means PGD alone over-reports robustness."""
    fig = _figure((max(6, 0.9 * len(result.models) + 2), 4))
    ax = fig.add_subplot()
    eps = result.config.headline_eps
    series = [(f"PGD {lib}", lambda m, lib=lib: m.pgd[lib].get(eps)) for lib in _libraries(result)]
    series.append(("worst case", lambda m: m.worst_case.get(eps)))
    width = 0.8 / len(series)
    for k, (label, value) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(result.models))]
        ax.bar(xs, [100 * (value(m) or 0.0) for m in result.models], width, label=label,
               color="black" if label == "worst case" else None)
    ax.set_xticks(range(len(result.models)), [m.name for m in result.models], rotation=30,
                  ha="right", fontsize="small")
    ax.set_ylabel(f"robust accuracy at eps {eps:g} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    if path is not None:
        save_figure(fig, path, dpi=90)
    return fig


def _libraries(result: ExperimentResult) -> list[str]:
    """The libraries whose PGD the result's models hold, in the result's order."""
    return list(dict.fromkeys(lib for m in result.models for lib in m.pgd))


def _per_eps_rows(result: ExperimentResult) -> list[list[str]]:
    return [[m.name, f"{e:g}", *(pct(m.pgd[lib].get(e)) for lib in _libraries(result)),
             pct(m.worst_case.get(e)), pct(m.certified.get(e)),
             pct(min((a[e] for a in m.attacks.values() if a.get(e) is not None), default=None))]
            for m in result.models for e in result.config.eps]


def _settings(result: ExperimentResult) -> list[tuple[str, Any]]:
    c = result.config
    tm = c.threat_model()
    steps = ", ".join(f"{tm.step_size_for(e):.4g} at eps {e:g}" for e in c.eps)
    training = {
        "standard": "clean batches",
        "fgsm": f"FGSM examples, one signed-gradient step of eps {c.train_eps:g} from the clean "
                "point, loss 0.5 * clean + 0.5 * adversarial (Goodfellow et al.)",
        "fgsm_rs": f"FGSM with a random start (fast AT), eps {c.train_eps:g}",
        "pgd": f"PGD-AT, eps {c.train_eps:g}",
        "ibp": f"IBP training (Gowal et al. 2018) at eps {c.train_eps:g}: clean steps, then eps "
               "ramped up while kappa goes 1 -> 0.5 (relucap_plugin.certification.losses)",
        "crown_ibp": f"CROWN-IBP training (Zhang et al. 2020) at eps {c.train_eps:g}: as IBP, "
                     "with beta 1 -> 0 mixing the CROWN-IBP margin",
    }
    methods = sorted({m.spec.training for m in result.models})
    return [
        ("data", f"{c.data}: {'all' if c.n_train is None else c.n_train} training digits, the "
                 f"first {c.n_samples} test digits attacked (split seeded with {c.seed})"),
        ("model", f"MLP {'-'.join(map(str, c.widths))}, inputs in [0, 1]; every model starts "
                  f"from the same initial weights (torch.manual_seed({c.seed}))"),
        ("caps", ", ".join(f"{v:g}" for v in c.caps) + " at positions " + ", ".join(c.positions)
         + "; installed with cap_relus on the untrained net, then trained"),
        ("training", f"Adam lr {c.lr:g}, batch {c.batch_size}, {c.epochs} epoch(s), seed {c.seed}; "
                     + "; ".join(f"{t}: {training[t]}" for t in methods)),
        ("threat model", f"L-inf, eps {', '.join(f'{e:g}' for e in c.eps)}, bounds (0, 1)"),
        ("PGD", f"{tm.steps} steps, step size {STEP_SIZE_FACTOR} * eps / steps ({steps}), "
                f"random start, {tm.restarts} restart(s), cross-entropy; the same ThreatModel "
                "configures torchattacks, Foolbox and ART"),
        ("standard suite", f"torch:PGD with CE and margin loss, both again with a straight-through "
                           f"gradient through the caps (BPDA), Square ({c.square_queries} queries), "
                           "PGD transferred from the uncapped twin; plus torch:FGSM"),
        ("worst case", "per sample, the minimum over every attack of the run (the three library "
                       "PGDs, the suite and FGSM), then the mean over samples"),
        ("certified", f"relucap_plugin.certification.certify, method {c.certify_method!r}: a "
                      "sample is certified when a lower bound of its logit margin over the whole "
                      "eps-ball is positive (sound bounds, never an attack); certified <= true "
                      "robust accuracy <= worst case"),
        ("masking verdict", "relucap_plugin.diagnostics.audit: ten checks, evidence (exact "
                            "McNemar, family-wise alpha 0.05) vs risk factors, three levels; see "
                            "docs/honest-evaluation.md"),
        ("best cap", "the capped model (first training method) with the highest worst-case "
                     f"robust accuracy at eps {c.headline_eps:g}; ties: higher clean accuracy, "
                     "then the earlier grid cell"),
        ("device", f"{c.device}, torch threads: {'unchanged' if c.threads is None else c.threads}"),
        ("seed", c.seed),
        ("wall time", f"{result.seconds:.1f} s"),
    ]


def write_report(result: ExperimentResult, folder: str | os.PathLike) -> str:
    """Write ``report.md``, ``summary.json`` and the plots of ``result`` into ``folder``;
    returns the path of ``report.md``. Without matplotlib the report says the plots are
    missing and why."""
    if not all(hasattr(result, a) for a in ("models", "config", "table_rows", "TABLE_COLUMNS")):
        raise TypeError(f"result must be an ExperimentResult, got {type(result).__name__} {result!r:.80}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    c = result.config
    plots_note = None
    try:
        plot_robust_accuracy(result, os.path.join(folder, PLOTS["robust_accuracy"]))
        plot_pgd_vs_worst_case(result, os.path.join(folder, PLOTS["pgd_vs_worst_case"]))
        if result.growth is not None:
            result.growth.plot(os.path.join(folder, PLOTS["growth"]))
    except ImportError as exc:
        plots_note = f"Plots not drawn: {exc}."

    lines = [
        "# relucap experiment report",
        "",
        "These are **our numbers**, measured by relucap-plugin in this run with the settings "
        "listed below. They are not figures from arXiv 2405.03777 (Sooksatra, Hamerly, Rivas, "
        "\"Is ReLU Adversarially Robust?\"), whose table values are not available to us; compare "
        "trends, not values.",
        "",
        f"## Results at eps {c.headline_eps:g}",
        "",
        markdown_table(result.TABLE_COLUMNS, result.table_rows()),
        "",
        "Robust accuracy counts a sample as robust only if it is classified correctly clean and "
        "on the verified adversarial example. *PGD <library>*: the same PGD through each "
        "library. *worst case*: per sample, the minimum over every attack of the run. *masking "
        "verdict*: *measured* when an attack gap (black-box, transfer, BPDA, single step or more "
        "steps beating white-box PGD) is significant on paired per-sample outcomes (exact McNemar "
        "test, Bonferroni), with PGD's over-report at this eps (the white-box PGDs minus the worst "
        "case, points) and its 95% interval; *risk factors only* when only zero gradients, saturated caps and the like "
        "fired; *no sign* otherwise. *certified*: samples whose certified bound ("
        f"{c.certify_method}) proves that no input of the eps-ball changes the prediction, the "
        "lower end of the bracket certified <= true robust accuracy <= worst case.",
        "",
    ]
    if result.best is not None:
        lines += [f"Best cap: **{result.best}** (highest worst-case robust accuracy at eps "
                  f"{c.headline_eps:g} among the capped models of the first training method; ties: "
                  "higher clean accuracy, then the earlier grid cell).", ""]
    lines += [
        "## Robust accuracy per eps",
        "",
        markdown_table(["model", "eps", *(f"PGD {lib}" for lib in _libraries(result)), "worst case",
                        "certified", "strongest single attack"], _per_eps_rows(result)),
        "",
        "## Plots",
        "",
    ]
    if plots_note:
        lines += [plots_note, ""]
    else:
        lines += [
            f"![robust accuracy vs eps]({PLOTS['robust_accuracy']})",
            "",
            "Robust accuracy vs eps per model (eps 0 is clean accuracy): PGD alone (left) and the "
            "worst case over all attacks (right). Dashed: adversarially trained.",
            "",
            f"![PGD vs worst case]({PLOTS['pgd_vs_worst_case']})",
            "",
            f"PGD through each library next to the worst case, at eps {c.headline_eps:g}.",
            "",
        ]
    if result.growth is not None:
        lines += [
            "## Perturbation growth per layer",
            "",
            f"Model **{result.growth_model}** and its uncapped twin (same weights, ReLU instead "
            f"of the caps), fed the same clean inputs and PGD examples at eps {c.headline_eps:g} "
            "crafted on the capped model: mean of ||h(x_adv) - h(x)||_2 / ||x_adv - x||_2 per "
            "layer output.",
            "",
            markdown_table(("layer", "type", "capped", "uncapped twin"), result.growth._cells()),
            "",
        ]
        if not plots_note:
            lines += [f"![perturbation growth]({PLOTS['growth']})", ""]
    lines += ["## Masking verdicts", ""]
    lines += [f"- **{m.name}**: {m.verdict.split(': ', 1)[-1]}" for m in result.models]
    lines += ["", "## Models", ""]
    lines += [markdown_table(
        ["model", "capped sites", "training", "final train loss", "final train acc", "seconds"],
        [[m.name, ", ".join(f"{s} -> {a}" for s, a in m.capped_sites.items()) or "none",
          m.spec.training, f"{m.train_history['loss'][-1]:.4f}",
          pct(m.train_history["accuracy"][-1]), f"{m.seconds:.1f}"] for m in result.models]), ""]
    lines += ["## Settings", "", markdown_table(["setting", "value"], _settings(result)), ""]
    lines += ["Library versions: " + ", ".join(f"{k} {v}" for k, v in sorted(result.versions.items())),
              ""]
    lines += [
        "## Files",
        "",
        "- `results/<model>.jsonl`: every (sample, attack, eps) row; "
        "`relucap_plugin.Results.load(path)` reads one back (`.table()`, `.worst_case(eps)`, "
        "`.agreement()`).",
        "- `models/<model>.pt`: trained weights (`relucap_plugin.load_checkpoint`).",
        "- `summary.json`: this report's numbers and the full configuration.",
        "",
    ]
    path = atomic_write(check_target(os.path.join(folder, "report.md"), None, what="report"),
                        "\n".join(lines))
    summary = check_target(os.path.join(folder, "summary.json"), None, what="report")
    atomic_write(summary, json.dumps(result.to_dict(), indent=1, default=str))
    return path
