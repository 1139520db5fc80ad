"""Training: standard, FGSM adversarial training, fast AT (FGSM + random start) and PGD-AT.

:func:`train` trains a model in place and returns a :class:`TrainHistory`; the model ends in
eval mode (the mode every attack and evaluation expects). :func:`save_checkpoint` and
:func:`load_checkpoint` store weights as safetensors or as a weights-only torch state dict.

Adversarial examples are made inside the L-inf ball of radius ``eps`` and clipped to ``bounds``
(default (0, 1), the pixel range of every data set here), with the model in train mode like
Madry et al. and Wong et al. do; their gradients never reach the parameters' ``.grad``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _files
from ._console import progress as _progress
from .activations import apply_saved_caps, saved_caps
from ._torch import ONE_OUTPUT, check_finite_inputs, check_logits, check_module
from .data import DataLike, as_loader, check_complete_loader, check_labels, unpack_batch
from .threat import check_budget, check_linf_eps, resolve_device

__all__ = [
    "TRAIN_METHODS",
    "TrainHistory",
    "accuracy",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "train",
]

TRAIN_METHODS = ("standard", "fgsm", "fgsm_rs", "pgd", "ibp", "crown_ibp")
"""``standard``: clean examples. ``fgsm``: one signed-gradient step of size eps from the clean
point (Goodfellow et al. 2015; the adversarial training of arXiv 2405.03777). ``fgsm_rs``: a
uniform random start in the eps-ball, then one step of 1.25 * eps, projected back ("fast AT",
Wong, Rice, Kolter 2020). ``pgd``: random start and ``pgd_steps`` projected steps of
2.5 * eps / pgd_steps (Madry et al. 2018). ``ibp`` / ``crown_ibp``: certified training on the
margin lower bounds of the L-inf ball (Gowal et al. 2018; Zhang et al. 2020), eps ramped from 0
and the clean/bound mix kappa (and CROWN-IBP's beta) scheduled per step
(:func:`relucap_plugin.certification.certified_schedule`)."""
CERTIFIED_METHODS = ("ibp", "crown_ibp")

_OPTIMIZERS = ("adam", "sgd")
_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}


@dataclass
class TrainHistory:
    """What :func:`train` did: one loss and accuracy per epoch, on the inputs trained on.

    For adversarial methods ``accuracy`` is measured on the adversarial examples of each batch
    (with ``clean_weight`` > 0, on the clean and adversarial inputs together), before the step.
    ``config`` holds every hyperparameter, with defaults resolved (e.g. the step size used).
    """

    method: str
    config: dict[str, Any]
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything above."""
        return asdict(self)


def _positive(value: Any, name: str, integer: bool = False, allow_zero: bool = False) -> Any:
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        what = "int" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite {what} {bound} (got {value!r})")
    return value


def _check_bounds(bounds: Sequence[float] | None) -> tuple[float, float] | None:
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be a (low, high) pair or None (got {bounds!r})") from None
    if not lo < hi:
        raise ValueError(f"bounds must satisfy low < high (got {bounds!r}); pixels are (0, 1)")
    return lo, hi


def _adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
    bounds: tuple[float, float] | None,
    generator: torch.Generator | None,
) -> Tensor:
    """L-inf attack for training: optional uniform start (from ``generator``), ``steps`` signed
    steps of ``alpha`` on the cross-entropy, each projected onto the eps-ball around ``x`` and
    into ``bounds``: :func:`relucap_plugin.adapters.plain_torch.pgd`, the loop of ``torch:PGD``.
    Returns detached adversarial inputs of the shape of ``x``; parameter gradients are left
    untouched and the model stays in the mode it is in (train mode here).
    """
    from .adapters.plain_torch import pgd

    return pgd(model, x, y, eps, norm="Linf", steps=steps, step_size=alpha, random_start=random_start,
               loss="ce", bounds=bounds or (-math.inf, math.inf), generator=generator)


def _check_in_bounds(x: Tensor, bounds: tuple[float, float] | None) -> None:
    if bounds is not None and (x.min() < bounds[0] - 1e-6 or x.max() > bounds[1] + 1e-6):
        raise ValueError(
            f"inputs range over [{x.min().item():.3g}, {x.max().item():.3g}] but bounds are "
            f"{bounds}; keep pixels in [0, 1] and normalise inside the model, or pass the "
            "data's bounds (bounds=None for unbounded data)"
        )


def _make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _epoch_batches(loader: Any, epochs: int):
    """``(epoch, batch)`` over ``epochs`` passes of ``loader``."""
    for epoch in range(epochs):
        for batch in loader:
            yield epoch, batch


def train(
    model: nn.Module,
    data: DataLike,
    method: str = "standard",
    *,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 64,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 0.1,
    alpha: float | None = None,
    pgd_steps: int = 10,
    clean_weight: float | None = None,
    bounds: Sequence[float] | None = (0.0, 1.0),
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    schedule: dict[str, float] | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` with cross-entropy; return a :class:`TrainHistory`.

    ``method`` is one of :data:`TRAIN_METHODS`. Adversarial methods attack each batch in the
    L-inf ball of radius ``eps`` (step ``alpha``; default eps for ``fgsm``, 1.25 * eps for
    ``fgsm_rs``, 2.5 * eps / pgd_steps for ``pgd``) and minimise
    ``clean_weight * loss(clean) + (1 - clean_weight) * loss(adversarial)``. Its default follows
    each method's source: 0.5 for ``fgsm`` (the mixture of Goodfellow et al. 2015, which also
    keeps short runs from collapsing), 0 (adversarial examples only) for ``fgsm_rs`` and ``pgd``.
    ``optimizer`` is ``"adam"`` (default lr 1e-3) or ``"sgd"`` (default lr 0.01, ``momentum``);
    ``weight_decay`` is an L2 penalty on every trainable parameter, learnable caps included.

    ``data`` is an ``(x, y)`` pair, a ``Dataset`` (shuffled with ``seed``, ``batch_size``) or a
    ``DataLoader`` (used as is). The run is seeded inside a forked RNG (the caller's global RNG
    state is untouched), so on CPU the same seed and model give bit-identical weights. The model
    is moved to ``device`` and left there, in eval mode; if ``checkpoint`` is a path, the
    weights are saved there after every epoch (see :func:`save_checkpoint`).

    ``ibp`` and ``crown_ibp`` minimise the bound loss of :func:`relucap_plugin.certification.bound_loss`
    at ``eps`` (the target radius); ``schedule`` holds :func:`~relucap_plugin.certification.
    certified_schedule`'s ``warmup``, ``ramp`` (fractions of all steps) and ``kappa_end``.
    """
    check_module(model, "train")
    if method not in TRAIN_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(TRAIN_METHODS)}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    check_budget("epochs", _positive(epochs, "epochs", integer=True))
    _positive(batch_size, "batch_size", integer=True)
    lr = _DEFAULT_LR[optimizer] if lr is None else _positive(lr, "lr")
    _positive(weight_decay, "weight_decay", allow_zero=True)
    _positive(momentum, "momentum", allow_zero=True)
    _positive(seed, "seed", integer=True, allow_zero=True)
    if clean_weight is None:
        clean_weight = 0.5 if method == "fgsm" else 0.0
    if isinstance(clean_weight, bool) or not (
            isinstance(clean_weight, (int, float)) and 0.0 <= clean_weight <= 1.0):
        raise ValueError(f"clean_weight must be in [0, 1] (got {clean_weight!r}); 0 trains on "
                         "adversarial examples only")
    bounds = _check_bounds(bounds)
    dev = resolve_device(device)
    certified = method in CERTIFIED_METHODS
    adversarial = method != "standard" and not certified
    if certified:
        _positive(eps, "eps")
        schedule = _check_schedule(schedule)
        if bounds is None:
            raise ValueError(f"method={method!r} needs the input bounds (bounds=(0.0, 1.0) for "
                             "pixels); bounds=None is not supported for certified training")
    steps, random_start = 0, False
    if adversarial:
        _positive(eps, "eps")
        if method == "pgd":
            check_budget("pgd_steps", _positive(pgd_steps, "pgd_steps", integer=True))
        steps, random_start, factor = {
            "fgsm": (1, False, 1.0),
            "fgsm_rs": (1, True, 1.25),
            "pgd": (pgd_steps, True, 2.5 / pgd_steps),
        }[method]
        alpha = factor * eps if alpha is None else _positive(alpha, "alpha")
    if (adversarial or certified) and bounds is not None:
        check_linf_eps(float(eps), bounds)
    if checkpoint is not None:
        _checkpoint_format(checkpoint)
        _files.check_target(checkpoint, "checkpoint", what="checkpoint")
    loader = as_loader(data, batch_size=batch_size, shuffle=True, seed=seed)

    history = TrainHistory(method=method, config={
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": optimizer,
        "momentum": momentum if optimizer == "sgd" else None, "weight_decay": weight_decay,
        "eps": eps if adversarial else None, "alpha": alpha if adversarial else None,
        "steps": steps if adversarial else None, "random_start": random_start,
        "clean_weight": clean_weight if adversarial else None, "bounds": bounds, "seed": seed,
        "device": str(dev),
    })
    if certified:
        history.config.update(eps=eps, schedule=schedule)
    was_training = model.training
    start = time.perf_counter()
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    finished = False
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.enable_grad():
            torch.manual_seed(seed)
            attack_rng = torch.Generator().manual_seed(seed + 1)
            model.to(dev)
            model.train()
            opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
            total = len(loader) * epochs if hasattr(loader, "__len__") else None
            sums = [0.0, 0, 0]  # loss * n, correct, n
            current, step, graph = 0, 0, None
            num_classes: int | None = None
            for epoch, batch in _progress(_epoch_batches(loader, epochs), f"train ({method})",
                                          total=total, enabled=progress):
                if epoch != current:
                    _end_epoch(history, sums, model, checkpoint)
                    current = epoch
                x, y = unpack_batch(batch)
                where = f"training batch {step} (epoch {epoch})"
                step += 1
                check_finite_inputs(torch.as_tensor(x), where)
                x, y = x.to(dev), y.to(dev)
                if num_classes is None:
                    num_classes = _num_classes(model, x, "train", f"data ({where})")
                check_labels(y, num_classes, where)
                inputs, targets = x, y
                buffers = [b.detach().clone() for b in model.buffers()]
                if adversarial:
                    _check_in_bounds(x, bounds)
                    x_adv = _adversarial(model, x, y, eps, alpha, steps, random_start, bounds,
                                         attack_rng)
                    inputs, targets = (torch.cat([x, x_adv]), torch.cat([y, y])) if (
                        clean_weight > 0) else (x_adv, y)
                if certified:
                    _check_in_bounds(x, bounds)
                    loss, logits, graph = _certified_step(model, x, y, method, eps, step - 1,
                                                          total, schedule, bounds, graph)
                    losses = loss.detach().expand(len(y))
                else:
                    logits = model(inputs)
                    losses = F.cross_entropy(logits, targets, reduction="none")
                    if adversarial and clean_weight > 0:
                        n = len(x)
                        loss = (clean_weight * losses[:n].mean()
                                + (1 - clean_weight) * losses[n:].mean())
                    else:
                        loss = losses.mean()
                if not bool(torch.isfinite(loss)):
                    _restore_buffers(model, buffers)
                    raise FloatingPointError(
                        f"the training loss became {loss.item()} at {where} (lr={lr}); the model "
                        "is left as it was before this step. Lower lr, check the data, or "
                        "train from a checkpoint"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
                    _restore_buffers(model, buffers)
                    opt.zero_grad(set_to_none=True)
                    raise FloatingPointError(
                        f"the gradients became NaN/inf at {where} (loss {loss.item():.4g}, "
                        f"lr={lr}); the model is left as it was before this step. Lower lr or "
                        "check the model for overflow"
                    )
                opt.step()
                sums[0] += losses.detach().sum().item()
                sums[1] += (logits.detach().argmax(1) == targets).sum().item()
                sums[2] += len(targets)
            if sums[2] == 0:
                raise ValueError("the data gave no batches; pass a non-empty data set")
            _end_epoch(history, sums, model, checkpoint)
            opt.zero_grad(set_to_none=True)
        finished = True
    finally:
        model.train(was_training if not finished else False)
        history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def _num_classes(model: nn.Module, x: Tensor, fn: str, argument: str) -> int:
    """The model's number of outputs, from one sample in eval mode (no state changes); a batch
    the model cannot run is the user's ``argument`` of ``fn``, named with the shape it takes."""
    from .surgery.verify import first_output

    was = model.training
    model.eval()
    try:
        out = first_output(fn, model, x, argument)
    finally:
        model.train(was)
    if out.shape[-1] < 2:
        raise ValueError(f"{fn}: {ONE_OUTPUT.format(shape=tuple(out.shape))}")
    return int(out.shape[-1])


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: list[Tensor]) -> None:
    for b, old in zip(model.buffers(), saved):
        b.copy_(old)


def _check_schedule(schedule: dict[str, float] | None) -> dict[str, float]:
    defaults = {"warmup": 0.1, "ramp": 0.5, "kappa_end": 0.5}
    unknown = sorted(set(schedule or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown schedule key(s) {unknown}; valid: {sorted(defaults)}")
    out = {**defaults, **(schedule or {})}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ValueError(f"schedule[{k!r}] must be a fraction in [0, 1] (got {v!r})")
    return out


def _certified_step(model, x, y, method, eps, step, total, schedule, bounds, graph):
    """The bound loss of one batch (the certify package computes it; this only dispatches)."""
    from .certification import bound_loss, certified_schedule, compile_model

    if graph is None:
        with torch.no_grad():
            graph = compile_model(model, x[:1])
    sched = certified_schedule(step, total or 1, eps, **schedule)
    loss, logits = bound_loss(model, x, y, sched, method, bounds=bounds, graph=graph)
    return loss, logits, graph


def _end_epoch(history: TrainHistory, sums: list, model: nn.Module, checkpoint: Any) -> None:
    history.loss.append(sums[0] / max(sums[2], 1))
    history.accuracy.append(sums[1] / max(sums[2], 1))
    sums[:] = [0.0, 0, 0]
    if checkpoint is not None:
        save_checkpoint(model, checkpoint)


@torch.no_grad()
def accuracy(
    model: nn.Module, data: DataLike, batch_size: int = 512, device: str | torch.device = "auto"
) -> float:
    """Clean top-1 accuracy of ``model`` on ``data``, in eval mode; the caller's mode is kept.

    The model is evaluated where its parameters are (``device`` is used for a parameterless
    model only).
    """
    check_module(model, "accuracy")
    param = next(model.parameters(), None)
    dev = resolve_device(device) if param is None else param.device
    if param is not None:
        resolve_device(device)  # a bad device string is an error even where it is not used
    check_complete_loader(data, "accuracy", warn=True)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in as_loader(data, batch_size=batch_size):
            x, y = unpack_batch(batch)
            if total == 0:
                _num_classes(model, x.to(dev), "accuracy", "data (batch 0)")
            xd = x.to(dev)
            logits = check_logits(model(xd), "wrap the model so that it returns the logits tensor",
                                  "accuracy", xd)
            pred = logits.argmax(1).cpu()
            correct += (pred == check_labels(y, logits.shape[-1], f"accuracy's batch from sample {total}")).sum().item()
            total += len(pred)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the data set is empty; pass at least one (x, y) sample")
    return correct / total


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_format(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__} {path!r:.80}")
    if os.fspath(path).endswith(".safetensors"):
        _safetensors()
        return "safetensors"
    return "torch"


_CAPS = "relucap.caps"


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(
            "saving/loading .safetensors checkpoints needs the 'safetensors' package: "
            "pip install safetensors (or use a path not ending in .safetensors for a torch "
            "state dict)"
        ) from None
    return safetensors.torch


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Save ``model.state_dict()`` to ``path`` atomically; returns the path as a string.

    A path ending in ``.safetensors`` gives a safetensors file (needs ``safetensors``); any
    other path a torch state dict of CPU tensors that :func:`load_checkpoint` reads with
    ``torch.load(weights_only=True)``. The caps of ``CappedReLU`` modules (non-persistent
    buffers) are stored next to the weights (safetensors metadata, or the entry
    ``"relucap.caps"``), so :func:`load_checkpoint` can restore or refuse a model without them.
    The file is written to a temporary file and renamed, so a crash leaves the previous
    checkpoint whole; an existing file that is not a checkpoint is refused unless
    ``overwrite=True``.
    """
    check_module(model, "save_checkpoint")
    fmt = _checkpoint_format(path)
    path = _files.check_target(path, "checkpoint", overwrite=overwrite, what="checkpoint")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    caps = json.dumps(saved_caps(model)) if saved_caps(model) else None
    if fmt == "safetensors":
        _files.atomic_write(path, lambda tmp: _safetensors().save_file(
            state, tmp, metadata=None if caps is None else {_CAPS: caps}))
    else:
        if caps is not None:
            state[_CAPS] = torch.tensor(list(caps.encode()), dtype=torch.uint8)
        _files.atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, restore_caps: bool = False) -> nn.Module:
    """Load weights saved by :func:`save_checkpoint` into ``model``; returns ``model``.

    The keys and shapes are checked first: on a mismatch a ``ValueError`` names the missing,
    unexpected and mis-shaped entries and ``model`` is left unchanged. So are the caps saved
    with the weights: a model without them is refused, or with ``restore_caps=True`` gets them
    back where it has a ``nn.ReLU`` module (see :func:`~relucap_plugin.activations.apply_saved_caps`).
    """
    check_module(model, "load_checkpoint")
    fmt = _checkpoint_format(path)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    _files.check_target(path, None, what="checkpoint", hint="pass a file written by save_checkpoint")
    if fmt == "safetensors":
        try:
            state = _safetensors().load_file(path, device="cpu")
        except Exception as exc:
            raise ValueError(
                f"checkpoint {path!r} is not a valid safetensors file ({exc.__class__.__name__}: {exc}); "
                "save it with save_checkpoint"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"checkpoint {path!r} is not a weights-only torch state dict ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with save_checkpoint"
            ) from None
    caps = _caps_in(state, path, fmt)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict of tensors; save it with "
                         "save_checkpoint")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state) if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items)}" for label, items in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("shape mismatches", shapes)) if items]
        raise ValueError(
            f"checkpoint {path!r} does not fit this model ({'; '.join(parts)}); build the "
            "model with the same architecture (layers, widths, activations with parameters) "
            "as the one that was saved"
        )
    apply_saved_caps(model, caps, restore=restore_caps, where=f"checkpoint {path!r}")
    model.load_state_dict(state)
    return model


def _caps_in(state: Any, path: str, fmt: str) -> dict[str, Any]:
    """The caps stored by :func:`save_checkpoint` (taken out of a torch ``state``)."""
    if fmt == "safetensors":
        with _safetensors().safe_open(path, "pt") as f:
            text = (f.metadata() or {}).get(_CAPS)
    else:
        entry = state.pop(_CAPS, None) if isinstance(state, dict) else None
        text = None if entry is None else bytes(entry.tolist()).decode()
    return json.loads(text) if text else {}
