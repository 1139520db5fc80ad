"""Perturbation growth across layers: the mechanism of arXiv 2405.03777 on a user's model.

How much an input perturbation grows layer by layer, for the capped model and its uncapped twin
fed the same inputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._console import format_table, print_table
from .adaptive import uncapped_twin
from ._format import short_repr
from ._torch import caller_state, check_finite_inputs, check_module, model_device

__all__ = ["GrowthTable", "perturbation_growth"]

_SKIP_LAYERS = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_SKIP_NAMES = {t.__name__ for t in _SKIP_LAYERS}


@torch.no_grad()
def _layer_growth(model: nn.Module, x: Tensor, x_adv: Tensor) -> dict[str, tuple[str, float]]:
    """layer name -> (type, mean over samples of ||h(x_adv) - h(x)||_2 / ||x_adv - x||_2)."""
    outputs: dict[str, list[Tensor]] = {}
    types: dict[str, str] = {}

    def hook(name):
        def record(module, args, output):
            if isinstance(output, Tensor):
                outputs.setdefault(name, []).append(output.detach().flatten(1).double())
                types[name] = type(module).__name__
        return record

    leaves = [(n, m) for n, m in model.named_modules()
              if n and not any(True for _ in m.children()) and not isinstance(m, _SKIP_LAYERS)]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with caller_state(model):
            device = model_device(model, x.device)
            model(x.to(device))
            model(x_adv.to(device))
    finally:
        for h in handles:
            h.remove()
    d_in = (x_adv - x).flatten(1).double().norm(dim=1).to(device)
    moved = d_in > 0
    out = {}
    for name, (clean, adv) in ((n, o) for n, o in outputs.items() if len(o) == 2):
        ratio = (adv - clean).norm(dim=1)[moved] / d_in[moved]
        out[name] = (types[name], ratio.mean().item() if len(ratio) else math.nan)
    return out


@dataclass
class GrowthTable:
    """Per layer, the perturbation growth of the model and of its uncapped twin."""

    rows: list[dict[str, Any]]
    title: str | None = None

    def table(self) -> str:
        return format_table(("layer", "type", "capped", "uncapped"), self._cells())

    def _cells(self) -> list[list[str]]:
        return [[r["layer"], r["type"], f"{r['capped']:.4g}",
                 "" if r["uncapped"] is None else f"{r['uncapped']:.4g}"] for r in self.rows]

    def print(self, file=None) -> None:
        print_table(("layer", "type", "capped", "uncapped"), self._cells(),
                    title=self.title or "perturbation growth ||h(x_adv) - h(x)|| / ||x_adv - x||",
                    file=file)

    def plot(self, path: str | os.PathLike | None = None):
        """Growth per layer (log scale) for both models; saved as PNG to ``path`` if given.
        Returns the matplotlib ``Figure`` (Agg, pyplot untouched)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("GrowthTable.plot() needs matplotlib: pip install matplotlib") from None
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        idx = range(len(self.rows))
        ax.plot(idx, [r["capped"] for r in self.rows], marker="o", label="capped")
        if any(r["uncapped"] is not None for r in self.rows):
            ax.plot(idx, [r["uncapped"] for r in self.rows], marker="s", label="uncapped twin")
        ax.set_xticks(list(idx), [f"{r['layer']}\n{r['type']}" for r in self.rows], fontsize="x-small")
        ax.set_yscale("log")
        ax.set_ylabel("||h(x_adv) - h(x)|| / ||x_adv - x||")
        ax.grid(alpha=0.3)
        ax.legend()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=120)
        return fig


def perturbation_growth(model: nn.Module, x: Tensor, x_adv: Tensor, *, twin: bool = True,
                        certified: bool = False) -> GrowthTable:
    """Per layer (each leaf module's output), ``||h_l(x_adv) - h_l(x)||_2 / ||x_adv - x||_2``,
    mean over the samples of ``x``/``x_adv`` (N, ...) that differ, for ``model`` and (with
    ``twin``) its uncapped twin fed the same inputs. Flatten, Identity and Dropout are left out.

    ``certified=True`` measures the same mechanism as a bound: the mean IBP interval width of
    each layer's output over the whole Linf ball of radius ``max |x_adv - x|`` per sample
    (:func:`relucap_plugin.certification.interval_widths`); the model must be one certify
    supports.
    """
    check_module(model, "perturbation_growth")
    if not isinstance(x, Tensor) or not isinstance(x_adv, Tensor) or x.shape != x_adv.shape:
        raise ValueError(f"perturbation_growth: x and x_adv must be tensors of the same shape (N, ...), the "
                         f"clean inputs and their perturbed versions; got x={short_repr(x)}, "
                         f"x_adv={short_repr(x_adv)}")
    check_finite_inputs(x, "perturbation_growth: x")
    check_finite_inputs(x_adv, "perturbation_growth: x_adv")
    if not bool(((x_adv - x).flatten(1).abs().amax(1) > 0).any()):
        raise ValueError("x_adv equals x for every sample: there is no perturbation to follow; "
                         "pass adversarial (or noisy) inputs")
    measure = _certified_widths if certified else _layer_growth
    capped = measure(model, x, x_adv)
    uncapped = measure(uncapped_twin(model), x, x_adv) if twin else {}
    rows = [{"layer": n, "type": t, "capped": g, "uncapped": uncapped[n][1] if n in uncapped else None}
            for n, (t, g) in capped.items() if not certified or t not in _SKIP_NAMES]
    return GrowthTable(rows, "certified interval width per layer (IBP)" if certified else None)


def _certified_widths(model: nn.Module, x: Tensor, x_adv: Tensor) -> dict[str, tuple[str, float]]:
    from .certification import interval_widths

    eps = (x_adv - x).flatten(1).abs().amax(1)
    return interval_widths(model, x.to(model_device(model, x.device)), eps)
