"""A library-independent PGD/FGSM in plain torch: the reference the library adapters are checked
against, and the attack to use when gradients must flow through the model's own backward (e.g.
surrogate gradients through a capped ReLU).

``torch:PGD`` is Madry et al.'s PGD: optional uniform random start in the eps-ball, ``steps``
steps of ``step_size`` (sign of the gradient for Linf, the L2-normalised gradient for L2), each
followed by projection onto the ball and the bounds; the last iterate is returned. ``torch:FGSM``
is one step of size ``eps`` from the clean input. ``torch:APGD`` is Croce and Hein's APGD
(:func:`apgd`) and ``torch:APGD-T`` their APGD-T, one targeted APGD per target class against
the top ``targets`` other classes by clean logit (:class:`APGDT`).
``torch:Square`` (L-inf, score-based) lives in :mod:`~relucap_plugin.adapters.square`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import Attack, Native, project
from ..threat import LOSSES
from . import build_attack
from .square import Square

__all__ = ["ATTACKS", "ALIASES", "LIBRARY", "TARGET_ROWS", "apgd", "apgd_targets", "attack_loss", "build", "pgd", "top_targets"]

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
    #: the loop it runs, called with :meth:`_kwargs`
    function = staticmethod(pgd)

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
        return self.function(model, x, y, eps, target=target, generator=generators, **kwargs)

    def _native(self, model, eps, *, input_shape, num_classes):
        return Native(model, functools.partial(self.function, **self._kwargs(eps)), {"eps": eps})


class FGSM(PGD):
    """``torch:FGSM``: one step of size ``eps`` from the clean input (FGM for L2)."""

    family = "FGSM"
    native_name = "FGSM"

    def _kwargs(self, eps: float) -> dict:
        tm = self.threat_model
        return dict(norm=tm.norm, steps=1, step_size=eps, random_start=False, loss=tm.loss, bounds=tm.bounds)


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    steps: int = 100,
    loss: str = "dlr",
    bounds: tuple[float, float] = (0.0, 1.0),
    target: torch.Tensor | None = None,
    random_start: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
) -> torch.Tensor:
    """Croce and Hein's APGD (2020, Algorithm 1) on ``attack_loss``: returns, per sample (N, ...),
    an iterate that fooled the model (prediction other than ``y``; targeted: ``target``) if
    one did, else the iterate of highest loss.

    As in their paper and their code: first step size ``2 * eps``; each step a (sign or
    L2-normalised) gradient step, then a momentum step that weighs it by ``momentum`` (their
    alpha, 0.75) and the previous step by the rest, both projected; checkpoints after 22% of ``steps``, then periods shrinking by 3% of ``steps``
    down to 6%; at a checkpoint a sample whose loss rose in at most ``rho`` (0.75) of the
    period's steps, or whose step size was not halved at the last checkpoint and whose best loss
    did not improve since, halves its step size and restarts from its best point. Our design:
    the random start is :func:`pgd`'s (uniform in the ball, from ``generator``: one per sample
    keeps a sample's example independent of the batch).
    """
    x = x.detach()
    shape = (-1, *([1] * (x.dim() - 1)))
    x_adv = project(x, _random_start(x, eps, norm, generator), eps, norm, bounds) if random_start else x.clone()

    def ascent(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            logits = model(z)
            value = attack_loss(logits, y, loss, target)
            (grad,) = torch.autograd.grad(value.sum(), z)
        hit = logits.argmax(1) != y if target is None else logits.argmax(1) == target
        return grad, value.detach(), hit

    grad, value, hit = ascent(x_adv)
    step = torch.full((len(x),), 2.0 * eps, dtype=x.dtype, device=x.device)
    best, x_best, grad_best = value.clone(), x_adv.clone(), grad.clone()
    found, x_found = hit.clone(), x_adv.clone()
    x_prev, last = x_adv, value
    period, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    rises, since = torch.zeros_like(value), 0
    best_at_check, halved_at_check = best.clone(), torch.ones_like(found)
    for i in range(steps):
        a = momentum if i else 1.0
        z = project(x, x_adv + step.view(shape) * _step(grad, 1.0, norm), eps, norm, bounds)
        x_prev, x_adv = x_adv, project(x, x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), eps, norm, bounds)
        grad, value, hit = ascent(x_adv)
        x_found[hit] = x_adv[hit]
        found |= hit
        rises += value > last
        last = value
        better = value > best
        best[better], x_best[better], grad_best[better] = value[better], x_adv[better], grad[better]
        since += 1
        if since == period:
            halve = (rises <= rho * period) | (~halved_at_check & (best_at_check >= best))
            step[halve] /= 2
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            halved_at_check, best_at_check = halve, best.clone()
            rises.zero_()
            since, period = 0, max(period - shrink, shortest)
    return torch.where(found.view(shape), x_found, x_best).detach()


def top_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` classes other than ``y`` with the largest ``logits`` (N, C), best first: (N, k)."""
    return logits.scatter(1, y[:, None], -torch.inf).topk(k, dim=1).indices


#: Rows (samples x targets) :func:`apgd_targets` runs at once after the first target: few
#: survivors run several targets in one batch (fewer, larger iterations); results do not depend
#: on it.
TARGET_ROWS = 128


def apgd_targets(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    targets: int = 9,
    generators: Callable[[torch.Tensor, int], Sequence[torch.Generator]] | None = None,
    rows: int = TARGET_ROWS,
    **kwargs,
) -> torch.Tensor:
    """:func:`apgd` once per target class, the top ``targets`` other classes of ``y`` by clean
    logit (best first, at most all the others), each run only on the samples (N, ...) that no
    earlier target has made the model misclassify; a sample keeps its first success, else the
    last target's result. ``generators(positions, j)``: the random-start generators (one per
    sample at ``positions``) of target ``j``; ``None`` draws from the global RNG. ``kwargs``
    are :func:`apgd`'s (its ``loss`` is used in its targeted form).

    Our design: the first target runs alone (it breaks most samples it can break); the later
    ones run several at a time in one :func:`apgd` call, one row per (sample, target), as many
    targets as fit in ``rows`` rows: on few samples that is one loop of ``steps`` iterations
    instead of one per target. Each row draws from its own generator and :func:`apgd` treats
    rows independently, so a sample's example is the one the targets run one by one would give
    (``rows=1`` runs them one by one); the rows of its later targets in the same call are spent
    even when an earlier one breaks it.
    """
    with torch.no_grad():
        logits = model(x)
    order = top_targets(logits, y, min(targets, logits.shape[1] - 1))
    x_adv = x.detach().clone()
    todo = torch.arange(len(x), device=x.device)
    j = 0
    while j < order.shape[1] and len(todo):
        group = range(j, min(order.shape[1], j + (1 if j == 0 else max(1, rows // len(todo)))))
        at = todo.repeat(len(group))
        gens = None if generators is None else [g for t in group for g in generators(todo, t)]
        tried = apgd(model, x[at], y[at], eps, target=order[todo, group.start:group.stop].T.flatten(), generator=gens,
                     **kwargs).view(len(group), len(todo), *x.shape[1:])
        with torch.no_grad():
            hit = (model(tried.flatten(0, 1)).argmax(1) != y[at]).view(len(group), len(todo))
        first = torch.where(hit.any(0), hit.int().argmax(0), len(group) - 1)
        x_adv[todo] = tried[first, torch.arange(len(todo), device=x.device)]
        todo = todo[~hit.any(0)]
        j = group.stop
    return x_adv


class APGD(PGD):
    """``torch:APGD``: :func:`apgd` (Croce and Hein) with the threat model's norm, steps, loss,
    bounds, random start and restarts (``step_size`` is not used: APGD adapts its own)."""

    family = "APGD"
    native_name = "APGD"
    function = staticmethod(apgd)

    def _kwargs(self, eps: float) -> dict:
        tm = self.threat_model
        return dict(norm=tm.norm, steps=tm.steps, random_start=tm.random_start, loss=tm.loss,
                    bounds=tm.bounds)


class APGDT(APGD):
    """``torch:APGD-T``: :func:`apgd_targets`, every parameter but ``targets`` from the threat
    model.

    Follows Croce and Hein's APGD-T (AutoAttack): the top-k other classes by clean logit, one
    targeted APGD run per target, each only on the samples still robust, a sample's first
    success kept (any class other than the label); their loss is DLR-T (``loss="dlr"``,
    ``torch:APGD-T-DLR``), the threat model's loss is used in its targeted form. Our design:
    target ``j`` draws each sample's random start from its own generator for (call seed, sample
    id, ``restart * k + j``), so a sample's example does not depend on the other samples in the
    call. ``targets`` (override, default 9 as in their standard version, at most the classes
    but one) is k; a sample costs k APGD runs only if no target breaks it. Under a targeted
    threat model it is ``torch:APGD`` on the given targets.
    """

    family = "APGD-T"
    native_name = "APGD-T"

    def _accepted_overrides(self) -> list[str]:
        return ["targets"]

    def _check_overrides(self) -> None:
        super()._check_overrides()
        k = self.targets
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{self.name}: targets must be an int >= 1 (how many other classes "
                             f"to attack, best first by clean logit), got targets={k!r}")

    def required_classes(self, tm) -> int:
        """Its losses are targeted ones: DLR-T needs 4 classes, the others 2."""
        return 4 if tm.loss == "dlr" else 2

    @property
    def targets(self) -> int:
        """k: how many other classes are attacked, best first by clean logit."""
        return self.overrides.get("targets", 9)

    def _run(self, model, x, y, eps, target, ctx):
        if target is not None:
            return super()._run(model, x, y, eps, target, ctx)
        kwargs = self._kwargs(eps)
        k = min(self.targets, ctx.num_classes - 1)
        ids = ctx.sample_ids if ctx.sample_ids is not None else torch.arange(len(x))
        if ctx.seed is None:
            ctx.seed = int(torch.randint(2**62, ()))

        def generators(todo: torch.Tensor, j: int) -> list[torch.Generator]:
            return replace(ctx, sample_ids=ids[todo.cpu()], restart=ctx.restart * k + j).generators(len(todo))

        return apgd_targets(model, x, y, eps, targets=k,
                            generators=generators if kwargs["random_start"] else None, **kwargs)

    def _native(self, model, eps, *, input_shape, num_classes):
        return Native(model, functools.partial(apgd_targets, targets=self.targets, **self._kwargs(eps)),
                      {"eps": eps})


ATTACKS = {"PGD": PGD, "FGSM": FGSM, "APGD": APGD, "APGD-T": APGDT, "Square": Square}
ALIASES: dict = {
    "FGM": ("FGSM", {}),
    "PGD-CE": ("PGD", {"loss": "ce"}),
    "PGD-DLR": ("PGD", {"loss": "dlr"}),
    "PGD-margin": ("PGD", {"loss": "margin"}),
    "APGD-CE": ("APGD", {"loss": "ce"}),
    "APGD-DLR": ("APGD", {"loss": "dlr"}),
    "APGD-T-DLR": ("APGD-T", {"loss": "dlr"}),
    "APGD-T-margin": ("APGD-T", {"loss": "margin"}),
}


def build(name, threat_model, overrides, batch_size=None):
    return build_attack(LIBRARY, ATTACKS, ALIASES, name, threat_model, overrides, batch_size)
