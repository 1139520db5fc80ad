"""A library-independent PGD/FGSM in plain torch: the reference the library adapters are checked
against, and the attack to use when gradients must flow through the model's own backward (e.g.
surrogate gradients through a capped ReLU).

``torch:PGD`` is Madry et al.'s PGD: optional uniform random start in the eps-ball, ``steps``
steps of ``step_size`` (sign of the gradient for Linf, the L2-normalised gradient for L2), each
followed by projection onto the ball and the bounds; the last iterate is returned. ``torch:FGSM``
is one step of size ``eps`` from the clean input. ``torch:Square`` (L-inf, score-based) lives in
:mod:`~relucap_plugin.adapters.square`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack, Native, project
from ..threat import LOSSES
from . import build_attack
from .square import Square

__all__ = ["ATTACKS", "ALIASES", "LIBRARY", "attack_loss", "build", "pgd"]

LIBRARY = "torch"


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (N,) that the attacker maximises.

    ``"ce"``: cross-entropy of ``y`` (targeted: minus that of ``target``). ``"margin"``: best
    other logit minus the true one, as in Carlini-Wagner (targeted: target logit minus best
    other). ``"dlr"``: Croce and Hein's difference of logits ratio (targeted: their DLR-T).
    """
    if loss == "ce":
        return -F.cross_entropy(logits, target, reduction="none") if target is not None else F.cross_entropy(
            logits, y, reduction="none"
        )
    label = target if target is not None else y
    z_label = logits.gather(1, label[:, None]).squeeze(1)
    z_other = logits.scatter(1, label[:, None], -torch.inf).amax(1)
    if loss == "margin":
        return z_label - z_other if target is not None else z_other - z_label
    if loss == "dlr":
        z = logits.sort(dim=1).values
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        if target is None:
            return -(z_y - z_other) / (z[:, -1] - z[:, -3] + 1e-12)
        return -(z_y - z_label) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def _random_start(x: torch.Tensor, eps: float, norm: str,
                  generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """A uniform random point of the ``norm`` ball around ``x``, drawn from the global RNG on
    ``x``'s device, or from ``generator`` on the CPU (the same start on any device); a sequence
    of generators (one per sample) draws each sample's start from its own."""
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise ValueError(f"{len(generator)} generators for {len(x)} samples: pass one per sample")
        return torch.cat([_random_start(x[i:i + 1], eps, norm, g) for i, g in enumerate(generator)])
    device = x.device if generator is None else torch.device("cpu")
    if norm == "Linf":
        return x + torch.empty_like(x, device=device).uniform_(-eps, eps, generator=generator).to(x.device)
    direction = torch.empty_like(x, device=device).normal_(generator=generator).to(x.device)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    d = x[0].numel()
    radius = torch.empty(x.shape[0], device=device, dtype=x.dtype).uniform_(generator=generator).to(x.device)
    radius = radius ** (1.0 / d) * eps
    return x + direction * radius.view(-1, *([1] * (x.dim() - 1)))


def _step(grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return step_size * grad.sign()
    g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return step_size * grad / g_norm


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    loss: str = "ce",
    bounds: tuple[float, float] = (0.0, 1.0),
    target: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on ``attack_loss`` from ``x`` (N, ...); returns the last iterate.

    Gradients come from ``torch.autograd.grad`` through the model's own backward, so custom
    ``autograd.Function``\\ s (straight-through or other surrogate gradients) are used as written;
    parameter ``.grad``\\ s are not touched and the model's train/eval mode is the caller's.
    ``step_size=None`` is ``2.5 * eps / steps``. The random start comes from ``generator`` if
    given (a sequence: one generator per sample, so a sample's start does not depend on the
    others in the batch), else from the global RNG. Runs under ``torch.enable_grad()``. The one PGD loop of the
    package: ``torch:PGD``/``torch:FGSM`` and adversarial training
    (:func:`relucap_plugin.training.train`) both call it.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    x_adv = (project(x, _random_start(x, eps, norm, generator), eps, norm, bounds) if random_start
             else x.clone())
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            objective = attack_loss(model(x_adv), y, loss, target).sum()
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = project(x, x_adv.detach() + _step(grad, step_size, norm), eps, norm, bounds)
    return x_adv.detach()


class PGD(Attack):
    """``torch:PGD``: :func:`pgd` with every parameter from the threat model."""

    library = LIBRARY
    family = "PGD"
    native_name = "PGD"
    losses = LOSSES

    def _accepted_overrides(self) -> list[str]:
        return []

    def _kwargs(self, eps: float) -> dict:
        tm = self.threat_model
        return dict(
            norm=tm.norm, steps=tm.steps, step_size=tm.step_size_for(eps),
            random_start=tm.random_start, loss=tm.loss, bounds=tm.bounds,
        )

    def _run(self, model, x, y, eps, target, ctx):
        kwargs = self._kwargs(eps)
        generators = ctx.generators(len(x)) if kwargs["random_start"] else None
        return pgd(model, x, y, eps, target=target, generator=generators, **kwargs)

    def _native(self, model, eps, *, input_shape, num_classes):
        return Native(model, functools.partial(pgd, **self._kwargs(eps)), {"eps": eps})


class FGSM(PGD):
    """``torch:FGSM``: one step of size ``eps`` from the clean input (FGM for L2)."""

    family = "FGSM"
    native_name = "FGSM"

    def _kwargs(self, eps: float) -> dict:
        tm = self.threat_model
        return dict(norm=tm.norm, steps=1, step_size=eps, random_start=False, loss=tm.loss, bounds=tm.bounds)


ATTACKS = {"PGD": PGD, "FGSM": FGSM, "Square": Square}
ALIASES: dict = {
    "FGM": ("FGSM", {}),
    "PGD-CE": ("PGD", {"loss": "ce"}),
    "PGD-DLR": ("PGD", {"loss": "dlr"}),
    "PGD-margin": ("PGD", {"loss": "margin"}),
}


def build(name, threat_model, overrides, batch_size=None):
    return build_attack(LIBRARY, ATTACKS, ALIASES, name, threat_model, overrides, batch_size)
