"""What the integrity checks of issue 12 cost, as ratios measured side by side in one run.

For the paper's MNIST MLP (784-256-32-256-10) on 1000 digits with one cheap attack
(torch:FGSM at one eps), the parts ``evaluate`` adds on every run: the model digest, the data
digest pass (reading the data once more) and the parameter digest after each attack call,
against the whole ``evaluate`` call. Also the model digest of ResNet-18 (11.7M parameters).
The variants are interleaved in every repeat, so machine noise hits them alike.

    python benchmarks/bench_integrity.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from relucap_plugin import EvalConfig, ThreatModel, evaluate
from relucap_plugin._fingerprint import model_digest, parameters_digest
from relucap_plugin.data import as_loader, load_mnist5k
from relucap_plugin.distributed import LocalContext
from relucap_plugin.models import mlp


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp((256, 32, 256)).eval()
    data = load_mnist5k()[1]
    tm, cfg = ThreatModel("Linf", eps=0.1), EvalConfig(batch_size=256, device="cpu")
    calls = 4  # one attack call per batch of 256 over 1000 digits
    times: dict[str, list[float]] = {k: [] for k in ("evaluate", "model", "data", "params")}
    for _ in range(args.repeats):
        times["evaluate"].append(_seconds(
            lambda: evaluate(model, data, "torch:FGSM", tm, cfg, progress=False)))
        times["model"].append(_seconds(lambda: model_digest(model)))
        times["data"].append(_seconds(lambda: LocalContext(torch.device("cpu")).data_digest(as_loader(data, 256), None)))
        times["params"].append(calls * _seconds(lambda: parameters_digest(model)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MLP 784-256-32-256-10, 1000 digits, torch:FGSM, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"  evaluate (all checks included): {med['evaluate'] * 1e3:8.1f} ms")
    for key, label in (("model", "model digest"), ("data", "data digest pass"),
                       ("params", f"parameter digests ({calls} calls)")):
        print(f"  {label:32s}: {med[key] * 1e3:8.1f} ms = {med[key] / med['evaluate']:.3f}x "
              "of evaluate")
    try:
        import torchvision
    except ImportError:
        return
    resnet = torchvision.models.resnet18()
    t = statistics.median(_seconds(lambda: model_digest(resnet)) for _ in range(args.repeats))
    fwd = statistics.median(_seconds(lambda: resnet.eval()(torch.rand(8, 3, 224, 224)))
                            for _ in range(args.repeats))
    print(f"ResNet-18 model digest: {t * 1e3:.0f} ms = {t / fwd:.2f}x one forward pass of 8 "
          "images at 224x224")


if __name__ == "__main__":
    main()
