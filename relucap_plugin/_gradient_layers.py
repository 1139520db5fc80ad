"""Where an input gradient dies: the per-layer localisation behind the audit's zero-gradient flag.

Kept apart from :mod:`relucap_plugin.diagnostics` (which re-exports
:func:`zero_gradient_layers`) because it is a self-contained forward-hook probe, not a check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._torch import caller_state, model_device

__all__ = ["margin", "zero_gradient_layers"]


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Best other logit minus the true one, per sample (> 0: misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return z_other - z_y


def zero_gradient_layers(model: nn.Module, x: Tensor, y: Tensor, *, top: int = 3) -> list[dict[str, Any]]:
    """Where the input gradient of the logit margin dies: per leaf module, the fraction of
    samples whose gradient is non-zero at the module's output but all zero at its input; the
    ``top`` modules with the largest fraction (above 0), deepest first in a tie."""
    device = model_device(model, x.device)
    seen: list[tuple[str, Tensor, Tensor]] = []

    def hook(name):
        def record(module, args, output):
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor) \
                    and args[0].requires_grad and output.requires_grad:
                seen.append((name, args[0], output))
        return record

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with caller_state(model), torch.enable_grad():
            xd = x.detach().to(device).requires_grad_(True)
            total = margin(model(xd), y.to(device)).sum()
            tensors = [t for _, a, o in seen for t in (a, o)]
            grads = torch.autograd.grad(total, tensors, allow_unused=True) if tensors else []
    finally:
        for h in handles:
            h.remove()
    out = []
    for k, (name, _, _) in enumerate(seen):
        g_in, g_out = grads[2 * k], grads[2 * k + 1]
        if g_in is None or g_out is None:
            continue
        alive = (g_out.flatten(1) != 0).any(1)
        dead = (g_in.flatten(1) == 0).all(1)
        frac = (alive & dead).float().mean().item()
        if frac > 0:
            out.append({"layer": name, "type": type(model.get_submodule(name)).__name__,
                        "fraction": frac, "order": k})
    out.sort(key=lambda r: (-r["fraction"], -r["order"]))
    return [{k: v for k, v in r.items() if k != "order"} for r in out[:top]]
