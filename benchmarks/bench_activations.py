"""CappedReLU vs nn.ReLU vs nn.Hardtanh(0, cap): forward+backward time and bytes kept for backward.

Everything is measured side by side in one run (the variants are interleaved in every repeat,
so machine noise hits them alike) and printed as ratios to nn.ReLU. Targets (issue 2):
CappedReLU <= 1.05x ReLU's time and <= ReLU's saved bytes.

Two memory figures per variant:
- "alone": bytes of the tensors the activation itself keeps for backward;
- "in a chain": unique bytes kept by ``producer -> activation -> consumer`` where the consumer
  keeps its input (as Linear and Conv do). ReLU keeps its output, which the consumer keeps
  anyway; an activation that keeps its input adds a tensor there.

A 1-byte-mask variant (custom autograd Function keeping ``0 < x < cap`` as bool) is measured too:
the issue asked to use it if it is as fast.

    python benchmarks/bench_activations.py [--repeats 21] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from relucap_plugin import CappedReLU

CAP = 0.5


class _MaskCappedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap):
        ctx.save_for_backward((x > 0) & (x < cap))
        return F.hardtanh(x, 0.0, cap)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class MaskCappedReLU(nn.Module):
    def forward(self, x):
        return _MaskCappedReLU.apply(x, CAP)


def variants() -> dict[str, nn.Module]:
    return {
        "nn.ReLU": nn.ReLU(),
        "nn.Hardtanh(0, cap)": nn.Hardtanh(0.0, CAP),
        "CappedReLU": CappedReLU(CAP),
        "1-byte mask Function": MaskCappedReLU(),
    }


def saved_bytes(fn) -> int:
    """Unique storage bytes packed for backward while running ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 1 << 24])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mods = variants()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} interleaved repeats, "
          f"median time, cap={CAP}")
    for n in args.sizes:
        x = torch.randn(n, requires_grad=True)
        grad = torch.randn(n)
        v = torch.randn(n, requires_grad=True)
        w = torch.randn(n, requires_grad=True)
        times: dict[str, list[float]] = {k: [] for k in mods}
        for rep in range(args.repeats + 2):
            for name, m in mods.items():
                t0 = time.perf_counter()
                m(x).backward(grad)
                dt = time.perf_counter() - t0
                x.grad = None
                if rep >= 2:  # two warm-up rounds
                    times[name].append(dt)
        base_t = statistics.median(times["nn.ReLU"])
        alone = {k: saved_bytes(lambda m=m, x=x: m(x)) for k, m in mods.items()}
        chain = {k: saved_bytes(lambda m=m, x=x, v=v, w=w: m(x * v) * w) for k, m in mods.items()}
        print(f"\n{n:,} elements (nn.ReLU: {base_t * 1e3:.2f} ms fwd+bwd, "
              f"{alone['nn.ReLU'] / 2**20:.1f} MiB kept alone)")
        print(f"{'variant':<22} {'time/ReLU':>9} {'bytes alone/ReLU':>17} {'bytes in chain/ReLU':>20}")
        for k in mods:
            print(f"{k:<22} {statistics.median(times[k]) / base_t:9.3f} "
                  f"{alone[k] / alone['nn.ReLU']:17.3f} {chain[k] / chain['nn.ReLU']:20.3f}")
        ok_t = statistics.median(times["CappedReLU"]) / base_t <= 1.05
        ok_m = alone["CappedReLU"] <= alone["nn.ReLU"] and chain["CappedReLU"] <= chain["nn.ReLU"]
        print(f"target CappedReLU <= 1.05x ReLU time: {'met' if ok_t else 'MISSED'}; "
              f"<= ReLU saved bytes: {'met' if ok_m else 'MISSED'}")


if __name__ == "__main__":
    main()
