"""Capped models that stay quantizable (issue 13, failure 6): ``cap_relus(..., quantizable=True)``
on torchvision's quantization-ready resnet18 and mobilenet_v2, then ``fuse_model()`` and eager
``prepare``/``convert``; the quantized model must follow the float capped model."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn
from torch.ao import quantization as tq

from relucap_plugin.surgery import cap_relus, uncap
from relucap_plugin.surgery.quantize import CappedFunctional, _CapHook

torchvision = pytest.importorskip("torchvision")

CAP = 0.5


def _calibrated(name: str) -> nn.Module:
    """A randomly initialised model whose BatchNorm statistics come from random batches, so its
    activations are of order 1 (with default statistics they vanish) and a cap of 0.5 binds."""
    torch.manual_seed(0)
    model = getattr(torchvision.models.quantization, name)(weights=None, quantize=False)
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: _calibrated(name) for name in ("resnet18", "mobilenet_v2")}


def _quantize(model: nn.Module, engine: str, batches: list[torch.Tensor]) -> nn.Module:
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for eager quantization
        model.fuse_model()
        model.qconfig = tq.get_default_qconfig(engine)
        tq.prepare(model, inplace=True)
        with torch.no_grad():
            for x in batches:
                model(x)
        tq.convert(model, inplace=True)
    return model


ENGINES = [e for e in ("fbgemm", "qnnpack") if e in torch.backends.quantized.supported_engines]


# resnet18 under both engines: qnnpack's quantized clamp on channels_last tensors needed a
# workaround (see quantize._clamp) that only a qnnpack run with binding caps shows
CASES = ([("resnet18", ENGINES[0], math.inf), ("mobilenet_v2", ENGINES[-1], math.inf),
          ("mobilenet_v2", ENGINES[-1], CAP)] + [("resnet18", engine, CAP) for engine in ENGINES])


@pytest.mark.parametrize("name,engine,cap", CASES)
def test_quantized_capped_model_follows_float_capped_model(models, name, engine, cap):
    model = models[name]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)]
    x = torch.randn(8, 3, 32, 32, generator=gen)
    capped, report = cap_relus(model, cap, example_input=x[:1], quantizable=True)
    assert report.check.startswith("passed"), report.check
    assert report.count == len(report.sites) > 0
    floats, _ = cap_relus(model, cap)
    with torch.no_grad():
        want = floats(x)
        assert torch.equal(capped(x), want)
        quantized = _quantize(capped, engine, batches)
        peaks: list[tuple[float, float]] = []
        for m in quantized.modules():
            if any(isinstance(h, _CapHook) for h in m._forward_hooks.values()):
                m.register_forward_hook(
                    lambda _m, _a, out: peaks.append((out.dequantize().max().item(), out.q_scale())))
        got = quantized(x)
    assert any(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")
               for m in quantized.modules()), "fuse_model/convert left no fused quantized conv"
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert error < 0.25 * scale, (error, scale)
    if math.isinf(cap):
        assert not peaks
    else:
        # the cap survived fusion and conversion: every capped quantized site stays within
        # half a quantization step of the cap, and the cap binds (random weights: not everywhere)
        assert len(peaks) >= 9
        assert all(peak <= CAP + step / 2 for peak, step in peaks), peaks
        assert any(peak >= CAP - step for peak, step in peaks), peaks


def test_every_site_is_bounded_by_its_cap_in_the_float_model(models):
    model = models["resnet18"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    capped, report = cap_relus(model, CAP, example_input=x[:1], quantizable=True)
    peaks: list[float] = []
    for m in capped.modules():
        if type(m) is nn.ReLU:
            m.register_forward_hook(lambda _m, _a, out: peaks.append(out.max().item()))
        if isinstance(m, CappedFunctional):
            inner = m.add_relu
            m.__dict__["add_relu"] = lambda a, b, f=inner: peaks.append(f(a, b).max().item()) or f(a, b)
    with torch.no_grad():
        capped(x)
    assert len(peaks) == len(report.sites) == 17
    assert max(peaks) <= CAP
    assert sum(p == CAP for p in peaks) >= len(peaks) // 2  # the cap binds


def test_quantizable_conversion_copies_pickles_and_uncaps(models):
    model = models["resnet18"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    capped, _ = cap_relus(model, CAP, example_input=x[:1], quantizable=True)
    twin = copy.deepcopy(capped)
    with torch.no_grad():
        assert torch.equal(twin(x), capped(x))
        assert type(uncap(twin).layer1[0].add_relu).__name__ == "FloatFunctional"
        assert torch.equal(twin(x), model(x))
        assert not any(m._forward_hooks for m in twin.modules())


def test_fused_model_is_refused_because_convert_would_drop_the_cap(models):
    fused = copy.deepcopy(models["resnet18"])
    fused.fuse_model()
    with pytest.raises(ValueError, match="'conv1' is a fused ConvReLU2d.*quantizable=True"):
        cap_relus(fused, CAP)


class _FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return torch.relu(self.relu(self.conv(x)))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"cap": {"*": 1.0}}, TypeError, "one positive number"),
    ({"cap": "pssilu"}, TypeError, "one positive number"),
    ({"cap": 1.0, "sites": "relu"}, TypeError, "caps every site"),
    ({"cap": 1.0}, ValueError, r"\[':relu'\].*not FloatFunctional.add_relu"),
])
def test_quantizable_refusals_name_the_problem(kwargs, error, match):
    model = _FunctionalNet()
    with pytest.raises(error, match=match):
        cap_relus(model, example_input=torch.randn(1, 3, 8, 8), quantizable=True, **kwargs)
    assert type(model.relu) is nn.ReLU and not model.relu._forward_hooks


def test_unchecked_quantizable_conversion_says_so():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.warns(UserWarning, match="not self-checked: no example_input"):
        capped, report = cap_relus(model, CAP, quantizable=True)
    assert report.check.startswith("not run")
    assert capped(torch.full((1, 3), 2.0)).max().item() == CAP


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_qat_prepare_train_and_convert_keep_the_cap(models, name):
    """Quantization-aware training, eager mode: fuse_model(is_qat=True), prepare_qat, a few
    training steps, convert. The cap survives each stage: fake-quantized and quantized outputs
    of every capped site stay within half a quantization step of it."""
    engine = ENGINES[0]
    torch.backends.quantized.engine = engine
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    capped, report = cap_relus(models[name], CAP, example_input=x[:1], quantizable=True)
    assert report.check.startswith("passed"), report.check
    peaks: list[float] = []

    def watch(model: nn.Module) -> list:
        return [m.register_forward_hook(lambda _m, _a, out: peaks.append(float(
                    (out.dequantize() if out.is_quantized else out).max())))
                for m in model.modules()
                if any(isinstance(h, _CapHook) for h in m._forward_hooks.values())]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for eager quantization
        capped.train()
        capped.fuse_model(is_qat=True)
        gc.collect()  # the ReLU modules fusion dropped are gone: the model still deep-copies
        copy.deepcopy(capped)
        capped.qconfig = tq.get_default_qat_qconfig(engine)
        tq.prepare_qat(capped, inplace=True)
        assert any(type(m).__module__.startswith("torch.ao.nn.intrinsic.qat")
                   for m in capped.modules()), "prepare_qat swapped in no QAT module"
        handles = watch(capped)
        sites = len(handles)
        assert sites >= 9
        optimiser = torch.optim.SGD(capped.parameters(), lr=1e-3)
        for _ in range(2):
            loss = capped(x).logsumexp(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        assert len(peaks) == 2 * sites and max(peaks) <= CAP + 1e-6, max(peaks)
        assert all(torch.isfinite(p.grad).all() for p in capped.parameters() if p.grad is not None)
        for handle in handles:
            handle.remove()
        capped.eval()
        quantized = tq.convert(capped, inplace=False)
    assert any(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized")
               for m in quantized.modules()), "convert left no fused quantized conv"
    peaks.clear()
    steps: list[float] = []
    for m in quantized.modules():
        if any(isinstance(h, _CapHook) for h in m._forward_hooks.values()):
            m.register_forward_hook(lambda _m, _a, out: steps.append(out.q_scale()))
    watch(quantized)
    with torch.no_grad():
        out = quantized(x)
    assert torch.isfinite(out).all() and len(peaks) == len(steps) == sites
    assert all(peak <= CAP + step / 2 for peak, step in zip(peaks, steps)), (peaks, steps)
    assert any(peak >= CAP - step for peak, step in zip(peaks, steps)), peaks
