"""Calibration: per-site caps from the quantiles of each site's positive outputs on data."""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._torch import check_finite_inputs, float_dtype, model_device
from ._copy import copy_model
from ._records import ReluSite, _check_mode, _check_model
from .convert import convert_verified
from .select import _select
from .verify import _as_args, bad_example_input, probe

_CHECK_ROWS = 16  # rows of the first batch the conversion's self-check runs on

class _Recorder(nn.Module):
    """The site's own ReLU (or ReLU6) that keeps a sample of its positive outputs."""

    def __init__(self, upper: float, inplace: bool, max_samples: int):
        super().__init__()
        self.upper = upper
        self.inplace = inplace
        self.max_samples = max_samples
        self.samples: list[Tensor] = []
        self.max = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if math.isinf(self.upper):
            out = F.relu(x, self.inplace)
        else:
            out = F.hardtanh(x, 0.0, self.upper, self.inplace)
        values = out.detach().reshape(-1)
        values = values[values > 0]
        if values.numel():
            self.max = max(self.max, float(values.max()))
            step = -(-values.numel() // self.max_samples)
            self.samples.append(values[::step].float().cpu())
        return out

    def quantile(self, q: float) -> float:
        if not self.samples:
            return math.inf
        if q >= 1.0:
            return self.max
        values = torch.cat(self.samples)
        k = max(1, min(values.numel(), math.ceil(q * values.numel())))
        return float(values.kthvalue(k).values)


class _RecorderRecipe:
    """Builds one :class:`_Recorder` per site (never shared) and keeps them by site name."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self.built: dict[str, _Recorder] = {}

    def build(self, site: ReluSite) -> _Recorder:
        recorder = self.built[site.name] = _Recorder(site.upper, site.inplace, self.max_samples)
        return recorder

    def key(self, site: ReluSite) -> None:
        return None


def _input_batches(data: Any, batch_size: int) -> Iterator[Tensor]:
    """The inputs ``x`` of ``data`` batch by batch (a tensor is split into ``batch_size``
    chunks; the labels of ``(x, y)`` batches are not needed for calibration)."""
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a tensor, a DataLoader, or an iterable of tensors or (x, y) batches; "
            f"got {type(data).__name__} {data!r:.80}"
        )
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"each batch must be a tensor or an (x, y) pair whose x is a tensor; got "
                f"{type(batch).__name__}"
            )
        yield batch


def calibrate_caps(
    model: nn.Module,
    data: Any,
    quantile: float = 0.999,
    sites: Any = None,
    max_batches: int | None = None,
    *,
    mode: str = "auto",
    batch_size: int = 256,
    max_samples: int = 1 << 16,
) -> dict[str, float]:
    """Per-site caps: the ``quantile`` of each site's positive outputs over ``data``.

    ``data``: a DataLoader or iterable of tensors or ``(x, y)`` batches, or one tensor (split
    into ``batch_size`` chunks); at most ``max_batches`` batches are used. Each call site has a
    recorder of its own, so two calls of one shared ``nn.ReLU`` get separate caps. The model runs
    in eval mode on a copy; ``model`` is untouched. Each batch keeps at most ``max_samples``
    evenly strided values per site (``quantile=1`` is the exact maximum). A site with no
    positive output gets ``math.inf`` (with a warning). The result is a mapping that
    ``cap_relus(model, cap=caps)`` accepts.
    """
    _check_model(model, "calibrate_caps")
    mode = _check_mode(mode)
    if (isinstance(quantile, bool) or not isinstance(quantile, numbers.Real)
            or not 0.0 < quantile <= 1.0):
        raise ValueError(f"quantile must be a number in (0, 1] (got {quantile!r}); e.g. 0.999")
    if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None (got {max_batches!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (got {batch_size!r})")
    batches = _input_batches(data, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibrate_caps: data yielded no batch; pass at least one batch of inputs")
    work = copy_model(model).eval()
    device, dtype = model_device(work), float_dtype(work, torch.get_default_dtype())

    def prepare(x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(
                f"calibrate_caps: data holds {x.dtype} inputs; activation statistics need float "
                "inputs in the model's range, e.g. x.float() / 255 for uint8 images")
        check_finite_inputs(x, "calibrate_caps: data")
        return x.to(device=device, dtype=dtype)

    # the recorders are installed like any conversion and self-checked on a few rows of the
    # first batch (at cap=inf they are the sites' own ReLUs), so no site's statistics come
    # from a conversion that missed or bypassed it
    sample = prepare(first)[:_CHECK_ROWS]
    args = _as_args(sample)
    ref = probe(work, args)
    if ref.error is not None:
        raise bad_example_input("calibrate_caps", model, sample, ref.error,
                                "data (batch 0)") from ref.error
    recipe = _RecorderRecipe(max_samples)
    converter, _ = convert_verified(work, sample, (args, ref, ""), mode, "calibrate_caps",
                                    lambda disc: {s.index: recipe for s in _select(disc.sites, sites)})
    for message in converter.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    disc = converter.disc
    recorders = {i: recipe.built[disc.sites[i].name] for i in sorted(converter.used)}
    with torch.no_grad():
        for b, x in enumerate(itertools.chain([first], batches)):
            if max_batches is not None and b >= max_batches:
                break
            batch = prepare(x)
            try:
                work(batch)
            except Exception as exc:
                raise bad_example_input("calibrate_caps", model, batch, exc,
                                        f"data (batch {b})") from exc
    caps = {disc.sites[i].name: rec.quantile(float(quantile)) for i, rec in recorders.items()}
    dead = [name for name, value in caps.items() if math.isinf(value)]
    if dead:
        warnings.warn(
            f"calibrate_caps: no positive output at {len(dead)} site(s) ({', '.join(dead[:10])}"
            f"{', ...' if len(dead) > 10 else ''}); their cap is math.inf (plain ReLU)",
            UserWarning, stacklevel=2,
        )
    return caps
