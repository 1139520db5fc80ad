"""Off-subspace robustness of two-layer ReLU nets: default init vs small init vs weight decay.

Reproduces the effect of Melamed, Yehudai and Vardi (NeurIPS 2023, arXiv 2303.00783) on
synthetic data: inputs live in a random k-dimensional linear subspace of R^d and labels come
from a linear teacher inside it. Gradient descent only moves the first-layer weights inside
the data subspace, so their orthogonal part keeps its initial size; the input gradient then
points largely off the subspace, and a small perturbation orthogonal to the data flips the
label. A smaller initialisation scale or L2 weight decay shrinks that orthogonal part.

For each setting the table gives, on held-out points (all numbers are medians over them):

- ``|P_perp grad| / |P_par grad|``: off-subspace over on-subspace norm of the input gradient of
  the margin (logit of the true class minus the other);
- ``off-subspace flip``: L2 norm of the smallest perturbation orthogonal to the subspace that
  flips the label, found by DeepFool steps restricted to the orthogonal complement (``inf``
  when none flips it within the iterations);
- ``on-subspace flip``: the same inside the data subspace, the scale to compare with;
- ``|W1 P_perp|``: Frobenius norm of the first layer's weights off the subspace.

Run ``python examples/subspace_robustness.py`` (about 5 s of CPU once torch is imported) or
add ``--tiny`` (about 2 s).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from relucap_plugin import accuracy, mlp, train


def make_subspace_data(
    d: int, k: int, n_train: int, n_test: int, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
    """``(train, test, U)``: points ``x = U z`` with ``z ~ N(0, I_k)``, label ``[z . w > 0]``.

    ``U`` (d, k) has orthonormal columns spanning the data subspace.
    """
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    teacher = torch.randn(k, generator=g)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        z = torch.randn(n, k, generator=g)
        return z @ basis.T, (z @ teacher > 0).long()

    return sample(n_train), sample(n_test), basis


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, 1 - y[:, None]).squeeze(1)


def _flip_distance(
    model: nn.Module, x: Tensor, y: Tensor, project, steps: int
) -> Tensor:
    """Per-sample L2 norm of the smallest label flip found by DeepFool steps inside the span
    that ``project`` maps onto (``inf`` where none is found within ``steps``)."""
    delta = torch.zeros_like(x)
    distance = torch.full((len(x),), float("inf"))
    for _ in range(steps + 1):
        points = (x + delta).requires_grad_(True)
        margin = _margin(model, points, y)
        (grad,) = torch.autograd.grad(margin.sum(), points)
        margin, direction = margin.detach(), project(grad)
        newly = (margin <= 0) & distance.isinf()
        distance[newly] = delta[newly].norm(dim=1)
        step = (margin.clamp_min(0) + 1e-4) / direction.norm(dim=1).pow(2).clamp_min(1e-12)
        delta = delta - 1.02 * step[:, None] * direction
    return distance


def off_subspace_sensitivity(
    model: nn.Module, x: Tensor, y: Tensor, basis: Tensor, steps: int = 50
) -> dict[str, float]:
    """Medians over the correctly classified ``x`` of the gradient ratio and flip distances.

    ``x`` is (N, d) on the subspace spanned by ``basis`` (d, k); labels ``y`` are 0/1.
    """

    def on(v: Tensor) -> Tensor:
        return v @ basis @ basis.T

    def off(v: Tensor) -> Tensor:
        return v - on(v)

    points = x.detach().requires_grad_(True)
    margin = _margin(model, points, y)
    (grad,) = torch.autograd.grad(margin.sum(), points)
    keep = margin.detach() > 0
    ratio = off(grad).norm(dim=1) / on(grad).norm(dim=1).clamp_min(1e-12)
    weight = model[1].weight.detach()
    return {
        "grad_ratio": ratio[keep].median().item(),
        "off_flip": _flip_distance(model, x, y, off, steps)[keep].median().item(),
        "on_flip": _flip_distance(model, x, y, on, steps)[keep].median().item(),
        "perp_weight_norm": off(weight).norm().item(),
    }


def run(
    d: int = 100,
    k: int = 5,
    width: int = 500,
    n_train: int = 200,
    n_test: int = 200,
    epochs: int = 300,
    lr: float = 0.05,
    small_init: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """Train the three settings on the same data with full-batch SGD; one result row each."""
    (x_train, y_train), (x_test, y_test), basis = make_subspace_data(d, k, n_train, n_test, seed)
    settings = [
        ("default init", 1.0, 0.0),
        (f"init x {small_init:g}", small_init, 0.0),
        (f"weight decay {weight_decay:g}", 1.0, weight_decay),
    ]
    rows = []
    for name, init_scale, wd in settings:
        torch.manual_seed(seed)
        model = mlp(widths=(width,), in_shape=(d,), num_classes=2, init_scale=init_scale)
        history = train(model, (x_train, y_train), optimizer="sgd", lr=lr, epochs=epochs,
                        batch_size=n_train, weight_decay=wd, seed=seed, progress=False)
        rows.append({
            "setting": name,
            "init_scale": init_scale,
            "weight_decay": wd,
            "train_acc": history.accuracy[-1],
            "test_acc": accuracy(model, (x_test, y_test)),
            **off_subspace_sensitivity(model, x_test, y_test, basis),
        })
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smaller net and data (about 2 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d", type=int, default=100, help="ambient dimension")
    parser.add_argument("--k", type=int, default=5, help="dimension of the data subspace")
    parser.add_argument("--small-init", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small; more threads oversubscribe a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = {"width": 100, "n_train": 100, "n_test": 100, "epochs": 200} if args.tiny else {}
    rows = run(d=args.d, k=args.k, small_init=args.small_init, weight_decay=args.weight_decay,
               seed=args.seed, **size)
    print(f"two-layer ReLU net, data on a {args.k}-dim subspace of R^{args.d} (medians over test points)")
    print("setting | train acc | test acc | |P_perp grad| / |P_par grad| | off-subspace flip | "
          "on-subspace flip | |W1 P_perp|")
    for r in rows:
        print(f"{r['setting']} | {r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['grad_ratio']:.3f} | "
              f"{r['off_flip']:.3g} | {r['on_flip']:.3g} | {r['perp_weight_norm']:.3g}")
    return rows


if __name__ == "__main__":
    main()
