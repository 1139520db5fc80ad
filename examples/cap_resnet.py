"""Cap every ReLU of a torchvision ResNet-18 with ``cap_relus`` and attack it briefly.

The ResNet is built with ``weights=None`` (nothing is downloaded) for 10 classes. A ResNet
block applies one ``self.relu`` module twice, so the site table lists two sites for it; a
single cap for all of them is installed by swapping the modules. The weights are random, so
the labels are the model's own clean predictions: the numbers show that the pipeline runs on a
real CNN (caps, attacks through two libraries, the per-sample worst case), not how robust a
trained capped ResNet is.

Run ``python examples/cap_resnet.py`` (about a minute on a 2-core CPU) or add ``--tiny``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import torchvision

from relucap_plugin import EvalConfig, ThreatModel, cap_relus, evaluate, find_relus, print_sites


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=1.0, help="cap for every ReLU site (default 1)")
    parser.add_argument("--n", type=int, default=32, help="CIFAR-shaped random inputs (default 32)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--tiny", action="store_true", help="4 inputs, 2 PGD steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="torch CPU threads (default min(4, cores))")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, steps = (4, 2) if args.tiny else (args.n, args.steps)

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    sites = find_relus(model, x[:1])
    print_sites(sites[:6], title=f"resnet18: {len(sites)} ReLU sites (first 6 shown)")

    capped, report = cap_relus(model, args.cap, example_input=x[:1])
    report.print()
    with torch.no_grad():
        y = capped(x).argmax(1)  # random weights: attack the model's own predictions

    tm = ThreatModel("Linf", eps=(2 / 255, 8 / 255), steps=steps)
    results = evaluate(capped, (x, y), ["torch:PGD", "torchattacks:PGD"], tm,
                       EvalConfig(batch_size=n, seed=args.seed), progress=False,
                       model_name=f"resnet18, cap {args.cap:g} on all sites")
    results.print()
    return {"sites": sites, "report": report, "results": results, "model": capped}


if __name__ == "__main__":
    main()
