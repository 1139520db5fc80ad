"""Cost of certification: IBP vs one forward pass, CROWN vs PGD-40, per 1000 samples.

Models: the MNIST MLP 784-256-32-256-10 (``models.mlp``) and the small CNN (``models.small_cnn``:
two 3x3 conv + max-pool stages of 32 and 64 channels, a 128-unit hidden layer), both with
capped ReLUs (cap 1), random weights (bound cost does not depend on training), on 1000 MNIST-5k
test digits, Linf eps 0.1, batch 250.

- ``forward``: ``model(x)`` on the batch (no grad).
- ``IBP``: interval bounds of every node plus the margin bounds of the output
  (``Bounds(graph, ball).ibp_margin(spec, y)``), the graph compiled once beforehand (as
  ``certify`` does per run). Two ways: ``|W| per call`` recomputes every layer's ``|W|`` for
  each batch (any caller outside a scope); ``|W| reused`` runs inside
  ``graph.reuse_abs_weights()`` as ``certify`` does for its whole run.
- ``CROWN``: ``margins_on_graph(..., method="crown")`` in chunks of 32 samples (as ``certify``):
  intermediate CROWN passes for layers of at most 2048 units, then the margin pass.
- ``PGD-40``: the package's ``torch:PGD`` attack (40 steps), the cheapest attack of the suite.

CPU time of the process (one torch thread), best of the repeats, after an untimed warm-up; the
IBP/forward ratios are also given as the median of ratios of back-to-back runs. Target: IBP <= 3x
one forward pass.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_certify.py [--repeats 5] [--n 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from relucap_plugin import ThreatModel
from relucap_plugin.attacks import get_attack
from relucap_plugin.certification import compile_model
from relucap_plugin.certification.api import margins_on_graph
from relucap_plugin.certification.bounds import Ball, Bounds, margin_spec
from relucap_plugin.data import load_mnist5k
from relucap_plugin.models import mlp, small_cnn

EPS, BATCH, CHUNK = 0.1, 250, 32


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000, help="samples (default 1000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = load_mnist5k()[1].tensors
    x, y = x[: args.n], y[: args.n]
    tm = ThreatModel("Linf", eps=EPS)
    pgd = get_attack("torch:PGD", tm)
    models = {"MLP": mlp(activation="capped_relu(cap=1.0)").eval(),
              "small CNN": small_cnn(activation="capped_relu(cap=1.0)").eval()}
    print(f"{len(x)} samples, batch {BATCH}, Linf eps {EPS}; CPU seconds per 1000 samples (best of "
          f"{args.repeats})\n")
    print("| model | forward | IBP, |W| per call | IBP, |W| reused | IBP / forward, per call "
          "(best; median) | IBP / forward, reused (best; median) | CROWN | PGD-40 | CROWN / PGD-40 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        _measure(name, model, x, y, pgd, args.repeats)


def _measure(name, model, x, y, pgd, repeats) -> None:
    per = 1000 / len(x)
    graph = compile_model(model, x[:1])
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]

    @torch.no_grad()
    def forward():
        for xb, _ in batches:
            model(xb)

    @torch.no_grad()
    def ibp():
        for xb, yb in batches:
            Bounds(graph, Ball(xb, EPS, "Linf", (0.0, 1.0))).ibp_margin(
                margin_spec(yb, 10, xb.dtype), yb)

    def ibp_reused():
        with graph.reuse_abs_weights():
            ibp()

    @torch.no_grad()
    def crown():
        for i in range(0, len(x), CHUNK):
            margins_on_graph(graph, x[i:i + CHUNK], y[i:i + CHUNK], EPS, "Linf", (0.0, 1.0),
                             "crown")

    def attack():
        for xb, yb in batches:
            pgd(model, xb, yb, EPS, seed=0)

    for fn in (forward, ibp, ibp_reused, crown, attack):
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in ("forward", "ibp", "reused", "crown", "pgd")}
    for _ in range(repeats):
        times["forward"].append(_cpu(forward))
        times["ibp"].append(_cpu(ibp))
        times["reused"].append(_cpu(ibp_reused))
    for _ in range(max(1, repeats // 2)):
        times["crown"].append(_cpu(crown))
        times["pgd"].append(_cpu(attack))
    best = {k: min(v) * per for k, v in times.items()}

    def ratio(key: str) -> str:
        med = statistics.median(i / f for i, f in zip(times[key], times["forward"]))
        return f"{best[key] / best['forward']:.2f}x; {med:.2f}x"

    print(f"| {name} | {best['forward']:.3f} s | {best['ibp']:.3f} s | {best['reused']:.3f} s | "
          f"{ratio('ibp')} | {ratio('reused')} | {best['crown']:.2f} s | "
          f"{best['pgd']:.2f} s | {best['crown'] / best['pgd']:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
