"""Package-internal torch utilities: placement, the caller's model state, seeding, input checks.

Attacks, evaluation, diagnostics, training, growth and certification all run a user's model on a
user's tensors; the rules for doing so (which device and dtype the model lives on, what to
restore afterwards, how to seed a block, which inputs to refuse and with which message) live
here once. The names are public within the package and not exported from ``relucap_plugin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Placement


def all_modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` (the same modules in the same order, each once) in a third of
    its time: no generator per module. Surgery walks the tree of models with thousands of
    modules several times per call."""
    out, seen = [model], {model}

    def visit(parent: nn.Module) -> None:
        for child in parent._modules.values():
            if child is not None and child not in seen:
                seen.add(child)
                out.append(child)
                visit(child)

    visit(model)
    return out


def tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """The model's parameters, then its buffers."""
    yield from model.parameters()
    yield from model.buffers()


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Device of the model's first parameter or buffer; ``default`` for a stateless model."""
    for tensor in tensors(model):
        return tensor.device
    return default if default is not None else torch.device("cpu")


def float_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """Dtype of the model's first floating parameter or buffer; ``default`` if it has none."""
    for tensor in tensors(model):
        if tensor.is_floating_point():
            return tensor.dtype
    return default


# --------------------------------------------------------------------------------------------
# Caller state and seeding


@contextlib.contextmanager
def caller_state(model: nn.Module) -> Iterator[None]:
    """Run with ``model`` in eval mode and its parameters frozen; restore everything afterwards.

    Restored: every submodule's ``training`` flag (mixed modes survive), each parameter's
    ``requires_grad`` and ``.grad`` (libraries call ``zero_grad`` or backpropagate into weights),
    and the device, should a library have moved the model. Freezing the parameters also keeps
    attacks from computing weight gradients they do not need.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    devices = [(t, t.device) for t in tensors(model)]
    try:
        model.eval()
        for p, _, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        moved = any(t.device != d for t, d in devices)
        if moved:
            model.to(devices[0][1])
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch, numpy and ``random`` for the block and restore their states afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of (CUDA or CPU) memory."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


# --------------------------------------------------------------------------------------------
# Input and output checks


def check_finite_inputs(x: torch.Tensor, what: str) -> None:
    """Refuse inputs ``x`` (N, ...) holding NaN or inf (ValueError naming the samples)."""
    bad = (~torch.isfinite(x.detach().flatten(1))).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{what} holds NaN/inf values in {len(bad)} sample(s) (positions {bad[:5]}); clean or "
            "drop them (torch.nan_to_num, or x[torch.isfinite(x).flatten(1).all(1)])"
        )


def check_inputs(x: torch.Tensor, bounds: tuple[float, float], what: str) -> None:
    """Refuse inputs ``x`` (N, ...) that hold NaN/inf or leave the threat model's ``bounds``.

    The one input check of attack calls and of evaluation; ``what`` names the inputs in the
    message (``"x"``, ``"data samples 0..99"``).
    """
    check_finite_inputs(x, what)
    lo, hi = bounds
    x_min, x_max = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo <= x_min and x_max <= hi):
        raise ValueError(
            f"{what} has values in [{x_min:.4g}, {x_max:.4g}], outside the threat model's bounds "
            f"{tuple(bounds)}; feed inputs in bounds (pixels in [0, 1]; put normalisation inside the "
            "model) or set ThreatModel(bounds=...)"
        )


def check_logits(out: object, fix: str, where: str = "", x: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``out`` if it is a logits tensor (N, classes), else a TypeError ending in ``fix``.

    ``where`` prefixes the message (the attack's name); ``fix`` says how to make a model that
    returns a tuple or dict usable from the caller's side. ``x``: the inputs (N, ...), whose
    count the logits' rows must match (else the rows belong to no sample: ValueError).
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{prefix}the model must return logits of shape (N, classes), got {what}; {fix}")
    if x is not None and len(out) != len(x):
        raise ValueError(
            f"{prefix}the model returns {len(out)} rows of logits for {len(x)} inputs of shape "
            f"{tuple(x.shape)}, so its rows are not the samples' predictions: its forward folds "
            "other dimensions into the batch (x.view(-1, d) on inputs of another shape than it "
            "was built for). Pass inputs of the shape the model expects, and flatten with "
            "x.flatten(1) or x.view(x.shape[0], -1)")
    if out.shape[1] < 2:
        raise ValueError(f"{prefix}{ONE_OUTPUT.format(shape=tuple(out.shape))}")
    return out


#: The error for a model with one output (``shape``: its output's shape): its argmax is class 0
#: whatever the input, so every sample labelled 0 would count as correct and robust.
ONE_OUTPUT = (
    "the model returns one output per sample (shape {shape}), so its predicted class (the argmax) "
    "is 0 for every input and accuracy, robustness and certificates would count every sample "
    "labelled 0 as correct; a binary classifier with one logit z must return two, e.g. "
    "torch.cat([torch.zeros_like(z), z], 1) (class 1 when z > 0)")


def clean_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, where: str) -> torch.Tensor:
    """``forward(x)`` for clean inputs ``x`` (N, ...) -> logits (N, classes), refusing (ValueError) a
    model that cannot take ``x`` or returns NaN/inf logits: no robustness can be measured then."""
    try:
        logits = forward(x)
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        raise ValueError(
            f"{where}: the model failed on clean inputs of shape {tuple(x.shape)} ({exc}); pass data "
            "of the shape the model expects, e.g. (N, 1, 28, 28) for an MNIST model"
        ) from exc
    bad = (~torch.isfinite(logits)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{where}: the model returns non-finite logits (NaN/inf) on {len(bad)} of {len(x)} clean "
            f"inputs (positions {bad[:5]}), so no robustness can be measured; check its weights (a "
            "diverged training or a NaN checkpoint), the input scale and its activations"
        )
    return logits


#: The warning for a model whose outputs are probabilities (``where``: the data it saw).
PROBABILITIES = (
    "{where}: the model returns probabilities (every output row lies in [0, 1] and sums to 1): "
    "it ends with a softmax. Losses on probabilities saturate, so gradient attacks find fewer "
    "adversarial examples and robust accuracy is over-reported. Evaluate the logits: drop the "
    "final softmax (or return log-probabilities)")


#: The warning for a model whose logits change between two forward passes of the same inputs.
NONDETERMINISTIC = (
    "{where}: the model is random in eval mode (two forward passes of the same inputs differ by "
    "up to {diff:.3g} at logits up to {scale:.3g}): every prediction, clean and adversarial, is "
    "one random draw, and randomness hides gradients from attacks that do not average over it, "
    "so robust accuracy is over-reported. Make the model deterministic in eval mode (F.dropout "
    "needs training=self.training; no noise layers), or evaluate it with attacks that average "
    "over its randomness (EOT)")


#: The warning for a model whose logits of a sample depend on the other samples of its batch.
BATCH_DEPENDENT = (
    "{where}: the model's outputs depend on the other samples of the batch: the first {k} of "
    "{n} samples predicted on their own differ by up to {diff:.3g} at logits up to {scale:.3g}"
    "{error}. Its predictions, clean and adversarial, change with the batch size and with "
    "which samples an attack returns together, so the table is not a per-sample measurement. "
    "Use batch norm with running statistics (track_running_stats=True) or a per-sample "
    "normalisation (LayerNorm, GroupNorm)")


def logits_differ(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> tuple[bool, float, float]:
    """Whether two forward passes' logits ``a``, ``b`` (N, K) of the same inputs differ by more
    than ``rtol`` times the largest logit (at least 1); also the difference and that scale."""
    diff = (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0
    scale = a.detach().abs().max().item() if a.numel() else 0.0
    return not diff <= rtol * max(scale, 1.0), diff, scale


def looks_like_probabilities(logits: torch.Tensor, tol: float = 1e-4) -> bool:
    """True when every row of ``logits`` (N, classes >= 2) lies in [0, 1] and sums to 1 (within
    ``tol`` per class): the model ends with a softmax. Losses on probabilities saturate (a
    confident sample's gradient all but vanishes), so gradient attacks over-report robustness;
    log-probabilities are fine (a softmax of them is the model's own)."""
    if logits.dim() != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        return False
    z = logits.detach().float()
    return bool((z >= 0).all() and (z <= 1).all()
                and ((z.sum(1) - 1).abs() <= tol * z.shape[1]).all())


def check_module(model: object, where: str) -> None:
    """Refuse a ``model`` argument of ``where`` (a public function's name) that is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        from ._format import short_repr

        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__} "
                        f"{short_repr(model)}; build the model first (e.g. relucap_plugin.mlp())")


@dataclass
class CallContext:
    """What an adapter's :meth:`Attack._run` gets besides the data: resolved once per call."""

    device: torch.device
    num_classes: int
    batch_size: int | None
    #: The call's seed (``None``: drawn from the global generator when first needed), the
    #: samples' ids (``sample_ids`` of the call, by default their positions) and the restart
    #: number: an attack of ours draws each sample's noise from :meth:`generators`, so it does
    #: not depend on which other samples are in the call.
    seed: int | None = None
    sample_ids: torch.Tensor | None = None
    restart: int = 0

    def generators(self, n: int) -> list[torch.Generator]:
        """One CPU generator per sample of the run (``n`` of them), seeded by (call seed, sample
        id, restart): a sample's draws are the same whichever samples share the call. Our own
        design."""
        ids = range(n) if self.sample_ids is None else self.sample_ids.tolist()
        if len(ids) != n:
            raise RuntimeError(f"{len(ids)} sample ids for a run on {n} samples")
        if self.seed is None:
            self.seed = int(torch.randint(2**62, ()))
        return [torch.Generator().manual_seed(sample_seed(self.seed, i, self.restart)) for i in ids]


def check_sample_ids(sample_ids: Any, n: int) -> torch.Tensor | None:
    """``sample_ids`` as a CPU int64 tensor (N,), else a ``ValueError`` naming it."""
    from ._format import short_repr

    if sample_ids is None:
        return None
    try:
        ids = torch.as_tensor(sample_ids).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.shape != (n,) \
            or len(set(ids.tolist())) != n:
        raise ValueError(f"sample_ids must be {n} distinct integers, one per input, got "
                         f"{short_repr(sample_ids)}; pass e.g. the samples' indices in the data set")
    return ids.long()


def sample_seed(seed: int, sample_id: int, restart: int = 0) -> int:
    """Seed of one sample's random draws in one attack call (see :meth:`CallContext.generators`)."""
    digest = hashlib.sha256(f"{seed}|{sample_id}|{restart}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
