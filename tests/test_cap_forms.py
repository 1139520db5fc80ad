"""Caps however they are written get the same honest numbers (issue 14).

One small MLP per cap (784-128-32-128-10, the 32-unit bottleneck capped, trained once per test
with our CappedReLU) is rewritten with the same weights into five forms: CappedReLU, a clamp in
the user's own module, nn.Hardtanh(0, c), a scaled ReLU6 c/6 * relu6(6x/c) and
torch.minimum(relu(x), c). Each form gets the full audit (standard suite + FGSM + checks).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relucap_plugin import EvalConfig, ThreatModel
from relucap_plugin.activations import CappedReLU
from relucap_plugin.adaptive import find_caps, surrogate_gradients, uncapped_twin
from relucap_plugin.diagnostics import LEVELS, audit

TM = ThreatModel("Linf", eps=(0.1,), steps=10)
CFG = EvalConfig(batch_size=200, device="cpu")
SUITE = {"square_queries": 150}


class ClampCap(nn.Module):
    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return torch.clamp(x, 0, self.cap)


class Relu6Cap(nn.Module):
    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return self.cap / 6 * F.relu6(6 * x / self.cap)


class MinimumCap(nn.Module):
    def __init__(self, cap: float):
        super().__init__()
        self.register_buffer("cap", torch.tensor(cap))

    def forward(self, x):
        return torch.minimum(F.relu(x), self.cap)


FORMS = {
    "CappedReLU": CappedReLU,
    "clamp module": ClampCap,
    "nn.Hardtanh": lambda c: nn.Hardtanh(0.0, c),
    "scaled relu6": Relu6Cap,
    "torch.minimum": MinimumCap,
}
OPS = {"CappedReLU": "CappedReLU", "clamp module": "clamp", "nn.Hardtanh": "hardtanh",
       "scaled relu6": "relu6", "torch.minimum": "minimum"}


@pytest.fixture(scope="module")
def eval_batch(mnist5k):
    _, test = mnist5k
    return test.tensors[0][:200], test.tensors[1][:200]


def _trained(mnist5k, cap: float) -> nn.Module:
    from relucap_plugin.models import mlp
    from relucap_plugin.training import train

    train_set, _ = mnist5k
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = mlp((128, 32, 128))
    net[4] = CappedReLU(cap)
    train(net, train_set, "standard", epochs=3, lr=1e-3, batch_size=64, seed=0, device="cpu",
          progress=False)
    return net.eval()


def _forms(base: nn.Module, cap: float) -> dict[str, nn.Module]:
    out = {}
    for name, make in FORMS.items():
        m = copy.deepcopy(base)
        m[4] = make(cap)
        out[name] = m.eval()
    return out


def test_every_form_is_found_surrogated_and_uncapped_without_surgery(eval_batch):
    x = eval_batch[0][:16]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 16), CappedReLU(0.1),
                         nn.Linear(16, 10)).eval()
    forms = _forms(base, 0.1)
    ref = base(x)
    xr = x.clone().requires_grad_(True)
    with surrogate_gradients(base):
        base(xr).sum().backward()
    for name, m in forms.items():
        sites = find_caps(m, x).sites
        assert [(s.path, s.op) for s in sites] == [("4", OPS[name])], (name, sites)
        assert sites[0].high == ("6" if name == "scaled relu6" else "0.1")
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)
        xs = x.clone().requires_grad_(True)
        with surrogate_gradients(m):
            out = m(xs)
            assert torch.equal(out, m(x))  # the forward stays bit-identical under the surrogate
            out.sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
        assert not m[4]._forward_hooks and not m._forward_pre_hooks
        twin = uncapped_twin(m)
        torch.testing.assert_close(twin(x), uncapped_twin(base)(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)  # the model itself keeps its cap


@pytest.mark.slow
@pytest.mark.parametrize("cap", [0.01, 0.1, 1.0, 10.0])
def test_grid_of_forms_same_worst_case_and_calibrated_verdict(mnist5k, eval_batch, cap):
    """Must-show of issue 14: the worst case of each form within 2 points of CappedReLU's, BPDA
    and transfer in every suite, "masking measured" for caps <= 0.1, "no sign" for caps >= 10,
    and the verdict following the measured over-report (cap 1)."""
    forms = _forms(_trained(mnist5k, cap), cap)
    audits = {name: audit(m, eval_batch, TM, CFG, suite_kwargs=SUITE, model_name=name)
              for name, m in forms.items()}
    reference = audits["CappedReLU"].results.worst_case(0.1)
    for name, a in audits.items():
        r = a.results
        assert any("+bpda(" in s for s in r.attacks) and any("+transfer(" in s for s in r.attacks), name
        assert not r.failed() and not r.violations()
        assert abs(r.worst_case(0.1) - reference) <= 0.02, (name, r.worst_case(0.1), reference)
        assert len(a.caps) == 1 and a.caps[0].startswith("4:" + OPS[name]), a.caps
        over = a.over_report
        measured = a.level == LEVELS[0]
        assert measured == (over["interval"][0] >= 0.01), (name, a.verdict)
        if cap <= 0.1:
            assert measured, (name, a.verdict)
            assert f"PGD over-reports by {100 * over['over_report']:.1f} points" in a.verdict
        if cap >= 10:
            assert a.level == LEVELS[2], (name, a.verdict)


@pytest.mark.slow
def test_square_on_flat_mlp_with_input_shape_matches_square_on_images(mnist5k, eval_batch):
    """Square on the (N, 784) MLP with input_shape=(1, 28, 28) is within 3 points of Square on the
    same weights fed (N, 1, 28, 28); without input_shape the results say it ran on a 1-D layout."""
    from relucap_plugin.evaluation import evaluate
    from relucap_plugin.training import train

    train_set, _ = mnist5k
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), CappedReLU(0.1),
                         nn.Linear(64, 10))
    train(nn.Sequential(nn.Flatten(), flat), train_set, "standard", epochs=3, lr=1e-3, batch_size=64,
          seed=0, device="cpu", progress=False)
    flat.eval()
    image = nn.Sequential(nn.Flatten(), flat).eval()
    x, y = eval_batch
    tm = ThreatModel("Linf", eps=(0.1,), steps=300)
    square = "torchattacks:Square"
    on_image = evaluate(image, (x, y), [square], tm, CFG, progress=False)
    shaped = evaluate(flat, (x.flatten(1), y), [square], tm,
                      EvalConfig(batch_size=200, device="cpu", input_shape=(1, 28, 28)), progress=False)
    strip = evaluate(flat, (x.flatten(1), y), [square], tm, CFG, progress=False)
    a_image = on_image.robust_accuracy(square, 0.1)
    a_shaped = shaped.robust_accuracy(f"{square}@1x28x28", 0.1)
    assert abs(a_shaped - a_image) <= 0.03, (a_shaped, a_image, strip.robust_accuracy(square, 0.1))
    assert "1-D layout" in " ".join(strip.metadata["notes"]) and "notes" not in shaped.metadata
    assert shaped.metadata["config"]["input_shape"] == [1, 28, 28]


def test_cli_input_shape_reaches_the_black_box_attack(tmp_path, capsys):
    """`--input-shape 1,28,28` on flat data runs Square on the image layout; without it the results
    carry the 1-D note; a wrong shape is refused before any attack runs."""
    import json

    from relucap_plugin.cli import main

    torch.save({"x": torch.rand(12, 784), "y": torch.arange(12) % 10}, tmp_path / "flat.pt")
    common = ["evaluate", "mlp:16", "--data", str(tmp_path / "flat.pt"), "--attack", "torchattacks:Square",
              "--eps", "0.1", "--steps", "5", "--quiet"]
    assert main([*common, "--input-shape", "1,28,28", "--out", str(tmp_path / "a")]) == 0
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines()
    header = json.loads(lines[0])["metadata"]
    assert header["attacks"] == ["torchattacks:Square@1x28x28"] and "notes" not in header
    assert header["config"]["input_shape"] == [1, 28, 28]
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    header = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[0])["metadata"]
    assert "1-D layout" in header["notes"][0]
    capsys.readouterr()
    assert main([*common, "--input-shape", "1,20,20", "--out", str(tmp_path / "c")]) == 2
    assert "input_shape (1, 20, 20) holds 400 values but a sample of the data has 784" in capsys.readouterr().err
    assert main([*common, "--input-shape", "1,x", "--out", str(tmp_path / "d")]) == 2
    assert "--input-shape '1,x': write sizes like 1,28,28" in capsys.readouterr().err
    with pytest.raises(ValueError, match="input_shape must be the positive sizes"):
        EvalConfig(input_shape=(1, 0, 28))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_scripted_caps_are_reported_not_silently_missed(eval_batch):
    """Caps inside a scripted module cannot be reached: find_caps says so and the suite's
    results carry the warning; a torch.compile-d model is read through its eager module."""
    from relucap_plugin.adaptive import evaluate_suite, find_caps

    torch.manual_seed(0)
    x, y = eval_batch
    inner = torch.jit.script(nn.Sequential(nn.Linear(784, 32), ClampCap(0.1), nn.Linear(32, 10)))
    model = nn.Sequential(nn.Flatten(), inner).eval()
    scan = find_caps(model, x[:4])
    assert scan.sites == [] and scan.opaque == ["1"] and "cannot be reached" in scan.warning
    with pytest.warns(RuntimeWarning, match="cannot be reached"):
        results = evaluate_suite(model, (x[:20], y[:20]), TM.replace(steps=2), config=CFG,
                                 suite_kwargs={"square_queries": 5}, progress=False)
    assert any("cannot be reached" in n for n in results.metadata["notes"])
    eager = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), ClampCap(0.1), nn.Linear(32, 10)).eval()
    compiled = torch.compile(eager)  # not run: the caps are found in the eager module behind it
    assert [s.key for s in find_caps(compiled, x[:4]).sites] == ["2:clamp"]


def test_find_caps_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match=r"example_input must be a tensor \(N, \.\.\.\) the model accepts"):
        find_caps(nn.Linear(3, 3), [[0.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        find_caps(lambda x: x, torch.zeros(1, 3))


class _Mixed(nn.Module):
    """Input clipping (not a cap), then caps written in-place, with tensor bounds and as a method."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU6(inplace=True)
        self.register_buffer("hi", torch.full((8,), 0.5))
        self.fail = False

    def forward(self, x):
        x = x.clamp(0, 1)  # the input's own bounds: not a hidden activation
        h = self.fc1(x).clamp_(0, 0.3)
        h = self.act(self.fc2(h) * 4)
        if self.fail:
            raise RuntimeError("boom")
        return self.fc3(torch.clamp(h, torch.zeros(8), self.hi))


def test_inplace_tensor_bounds_and_input_clipping():
    torch.manual_seed(0)
    model = _Mixed().eval()
    x = torch.rand(32, 6) * 2 - 0.5
    scan = find_caps(model, x)
    assert [str(s) for s in scan.sites] == ["<model>:clamp_ [0, 0.3]", "act:hardtanh [0, 6]",
                                            "<model>:clamp [0, 0.5]"]
    before = model(x)
    xs = x.clone().requires_grad_(True)
    with surrogate_gradients(model):
        out = model(xs)
        assert torch.equal(out, before)
        out.sum().backward()
    assert model.act.inplace  # restored
    plain = x.clone().requires_grad_(True)
    model(plain).sum().backward()
    assert (xs.grad != 0).sum() > (plain.grad != 0).sum()  # the caps pass a gradient now
    model.fail = True
    with surrogate_gradients(model), pytest.raises(RuntimeError, match="boom"):
        model(x)
    assert torch._C._len_torch_function_stack() == 0  # the mode left with the failed forward
    model.fail = False
    twin = uncapped_twin(model)
    h = torch.relu(model.fc1(x.clamp(0, 1)))
    expected = model.fc3(torch.clamp(torch.relu(model.fc2(h) * 4), min=0))
    torch.testing.assert_close(twin(x), expected)
