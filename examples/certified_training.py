"""Certified training on MNIST-5k: the bracket certified <= robust accuracy <= worst case.

Trains one capped MLP per method (plain, FGSM, IBP, CROWN-IBP), then at Linf eps 0.1 on the
test digits certifies every sample (``certify``, method "best") and attacks it with the standard
suite (``evaluate_suite``); the two tables are merged, so a certified sample broken by a
verified adversarial example would stop the run with a ``BracketError``. Prints a Markdown table
(the one in docs/certification.md). ``--quick`` is a smoke run of a few seconds.

    python examples/certified_training.py [--quick] [--n-test 1000]
"""

from __future__ import annotations

import argparse
import time

import torch

from relucap_plugin import ThreatModel
from relucap_plugin.adaptive import evaluate_suite
from relucap_plugin.certification import certify
from relucap_plugin.data import load_digits_dataset, load_mnist5k
from relucap_plugin.models import mlp
from relucap_plugin.threat import EvalConfig
from relucap_plugin.training import train

EPS = 0.1
#: (row, train method, train() arguments); the certified methods train at twice the test eps
#: (Gowal et al. train at a larger eps than they test at).
RUNS = [
    ("plain", "standard", {"epochs": 10}),
    ("FGSM", "fgsm", {"epochs": 10, "eps": EPS}),
    ("IBP", "ibp", {"epochs": 30, "eps": 2 * EPS}),
    ("CROWN-IBP", "crown_ibp", {"epochs": 15, "eps": 2 * EPS}),
]


def run(quick: bool, n_test: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    if quick:
        train_set, test_set = load_digits_dataset()
        shape, n_test, scale, suite_kwargs = (1, 8, 8), min(n_test, 60), 0.1, {"square_queries": 50}
    else:
        train_set, test_set = load_mnist5k()
        shape, scale, suite_kwargs = (1, 28, 28), 1.0, {}
    tm = ThreatModel("Linf", eps=EPS)
    config = EvalConfig(batch_size=250, device="cpu", n_samples=n_test)
    out = []
    for name, method, kwargs in RUNS:
        model = mlp((256, 256), "capped_relu(cap=1.0)", in_shape=shape)
        kwargs = {**kwargs, "epochs": max(1, round(kwargs["epochs"] * scale))}
        start = time.perf_counter()
        train(model, train_set, method, progress=False, device="cpu", seed=seed, **kwargs)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        cert = certify(model, test_set, tm, "best", config, progress=False)
        cert_s = time.perf_counter() - start
        start = time.perf_counter()
        attacks = evaluate_suite(model, test_set, tm, config=config, progress=False,
                                 suite_kwargs=suite_kwargs)
        attack_s = time.perf_counter() - start
        table = attacks.merge(cert)  # raises BracketError on a certified-but-broken sample
        row = {"model": name, "train": method, "clean": table.clean_accuracy(),
               "certified": table.certified(EPS), "worst case": table.worst_case(EPS),
               "train s": train_s, "certify s": cert_s, "suite s": attack_s}
        row["gap (pts)"] = 100 * (row["worst case"] - row["certified"])
        out.append(row)
        print(_line(row), flush=True)
    return out


def _line(r: dict) -> str:
    return (f"| {r['model']} | {r['train']} | {100 * r['clean']:.1f}% | {100 * r['certified']:.1f}% "
            f"| {100 * r['worst case']:.1f}% | {r['gap (pts)']:.1f} | {r['train s']:.0f} "
            f"| {r['certify s']:.0f} | {r['suite s']:.0f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sklearn digits, few epochs")
    parser.add_argument("--n-test", type=int, default=1000, help="test samples (default 1000)")
    args = parser.parse_args(argv)
    print("| model | training | clean | certified (eps 0.1) | worst case over the suite | "
          "worst - certified (pts) | train s | certify s | suite s |")
    print("|---|---|---|---|---|---|---|---|---|")
    return run(args.quick, args.n_test)


if __name__ == "__main__":
    main()
