"""Discovery by running (relucap_plugin/surgery/running.py), the fast model copy (_copy.py) and
the checks of what enters surgery (issue 13, trace cost; issue 12, wrong example_input)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relucap_plugin.surgery.sites as sites_module
from relucap_plugin.surgery import UntraceableModelError, calibrate_caps, cap_relus, find_relus
from relucap_plugin.surgery._copy import copy_model
from relucap_plugin.surgery.sites import _discover
from tests.test_surgery import assert_same_snapshot, run, snapshot

torchvision = pytest.importorskip("torchvision")


class _Block(nn.Module):
    def __init__(self, c: int, six: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU6(inplace=True) if six else nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + x


class _ModuleNet(nn.Module):
    """Only ReLU modules: nested blocks, a shared ReLU called twice, a ReLU called by its
    grandparent (owner != parent), one called with a keyword, ReLU6, Sequential inside."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(_Block(8), _Block(8, six=True))
        self.shared = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = self.shared(x) - 0.1
        x = self.shared(input=x)
        x = self.blocks[0].act(x)
        return self.head(x.mean((2, 3)))


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return F.relu(self.lin(x)) + torch.relu(x)


class _Free(nn.Module):
    """A user module applying no ReLU (fx would trace into it)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        return self.inner(x) * 2


class _MixedNet(nn.Module):
    """ReLU-module blocks, ReLU-free blocks and one module applying functional ReLUs."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.func = _Functional()
        self.free = nn.Sequential(*[_Free() for _ in range(3)])
        self.rest = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])

    def forward(self, x):
        return self.rest(self.free(self.func(self.first(x))))


def _as_rows(found):
    return [(s.name, s.kind, s.op, s.module_path, s.owner, s.shared, s.inplace, s.shape, s.width)
            for s in found]


def _counting_traces(monkeypatch) -> list[int]:
    traces: list[int] = []
    original = sites_module._trace
    monkeypatch.setattr(sites_module, "_trace", lambda *a: traces.append(1) or original(*a))
    return traces


MODELS = {
    "module_net": (lambda: _ModuleNet().eval(), (1, 3, 16, 16)),
    "mixed_net": (lambda: _MixedNet().eval(), (2, 8)),
    "resnet18": (lambda: torchvision.models.resnet18().eval(), (1, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2().eval(), (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_discovery_by_running_finds_what_the_full_trace_finds(name):
    """The sites found by running (no trace, or a trace that stops at ReLU-free modules) are
    the full fx discovery's sites: names, kinds, owners, sharing, in-place flags, shapes."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    traced = _discover(model, x, "auto", "test")  # no run: fx traces the whole model
    assert traced.graph is not None and not traced.probed
    assert _as_rows(find_relus(model, x)) == _as_rows(traced.sites)
    assert [s.name for s in find_relus(model)] == [s.name for s in traced.sites]


def test_module_relus_need_no_trace_and_relu_free_modules_are_not_traced(monkeypatch):
    traces = _counting_traces(monkeypatch)
    torch.manual_seed(0)
    net = _ModuleNet().eval()
    x = torch.randn(2, 3, 16, 16)
    converted, report = cap_relus(net, 0.5)
    assert traces == [] and report.method == "modules" and report.check.startswith("passed")
    assert set(report.how.values()) == {"module"} and report.count == 6
    assert float(run(converted, x).abs().max()) < float("inf")

    mixed = _MixedNet().eval()
    found = find_relus(mixed)
    disc = found._found[2]
    assert traces == [1] and not disc.probed
    # fx went into the modules in which the run applied a ReLU; the ReLU-free ones stayed leaves
    assert "func" in disc.calls and not any(path.startswith("free") for path in disc.calls)
    converted, report = cap_relus(mixed, 0.25)
    assert report.rewritten == ("func",) and report.check.startswith("passed")
    assert float(run(converted, torch.randn(4, 8) * 5).max()) <= 0.25


def test_a_forward_that_reads_tensor_values_is_traced_not_run():
    """Control flow on a tensor value (another input could take the other branch, with other
    ReLUs): discovery by running would see one branch, so fx decides, and refuses."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:
                return self.act(x)
            return F.relu(-x)

    net = nn.Sequential(nn.Linear(4, 4), Gate()).eval()
    with pytest.raises(UntraceableModelError, match="module '1' \\(Gate\\)"):
        find_relus(net)
    with pytest.raises(UntraceableModelError, match="module '1' \\(Gate\\)"):
        cap_relus(net, 0.5)


def test_in_place_relu_whose_input_is_read_later_gets_a_trace():
    """An in-place ReLU's input read after it, capped per channel (not in place): only graph
    nodes tell whether the input is read later, so the discovery by running asks for a trace,
    and the rewrite keeps the in-place semantics."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.lin(x)
            y = self.relu(h)
            return y + h  # h was changed in place: y + y

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(8, 4) * 3
    caps = torch.tensor([0.1, 0.2, 0.3, 0.4])
    converted, report = cap_relus(net, caps)
    assert report.how == {"relu": "fx"} and report.check.startswith("passed")
    capped = torch.minimum(net.lin(x).clamp(min=0), caps)
    assert torch.equal(run(converted, x), capped + capped)


def test_copy_model_is_a_deep_copy():
    """copy_model gives what copy.deepcopy gives: classes, values, modes, hooks, and sharing
    (tied weights, a module registered twice, a buffer viewing another's storage)."""

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.copied = 0

        def __deepcopy__(self, memo):
            new = Custom()
            new.load_state_dict(self.state_dict())
            new.copied = self.copied + 1
            return new

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.relu = nn.ReLU()
            self.again = self.relu
            self.custom = Custom()
            self.bn = nn.BatchNorm1d(3)
            self.register_buffer("whole", torch.arange(6.0))
            self.register_buffer("view", self.whole[2:4])
            self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
            self.flag = {"k": [1, 2]}

        def forward(self, x):
            return self.custom.lin(self.relu(self.b(self.a(x))))

    net = Net()
    net.bn.eval()
    seen = []
    net.a.register_forward_hook(lambda m, i, o: seen.append(1))
    for new in (copy_model(net), copy.deepcopy(net)):
        assert [type(m) for m in new.modules()] == [type(m) for m in net.modules()]
        assert new.b.weight is new.a.weight and new.a.weight is not net.a.weight
        assert new.again is new.relu and new.custom.copied == 1
        assert new.view.untyped_storage().data_ptr() == new.whole.untyped_storage().data_ptr()
        assert new.whole.data_ptr() != net.whole.data_ptr()
        assert not new.frozen.requires_grad and new.bn.training is False and new.a.training
        assert new.flag == net.flag and new.flag["k"] is not net.flag["k"]
        state, original = new.state_dict(), net.state_dict()
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in state)
        new(torch.ones(2, 3))
    assert seen == [1, 1]


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()


@pytest.mark.parametrize("value,described", [
    (torch.randn(784), r"a torch.float32 tensor of shape \(784,\) on cpu"),
    (torch.randint(0, 255, (1, 3, 16, 16)), r"a torch.int64 tensor of shape \(1, 3, 16, 16\)"),
    ([1, 2, 3], r"a list of 3 forward argument\(s\)"),
])
@pytest.mark.parametrize("fn", ["cap_relus", "cap_relus_inplace", "find_relus", "find_modules"])
def test_wrong_example_input_names_the_argument_the_value_and_the_fix(fn, value, described):
    net = _conv_net()
    before = snapshot(net)
    call = {"cap_relus": lambda: cap_relus(net, 0.5, example_input=value),
            "cap_relus_inplace": lambda: cap_relus(net, 0.5, example_input=value, inplace=True),
            "find_relus": lambda: find_relus(net, value),
            "find_modules": lambda: find_relus(net, value, mode="modules")}[fn]
    name = "find_relus" if fn.startswith("find") else "cap_relus"
    with pytest.raises(ValueError, match=rf"{name}: example_input does not run through "
                                         rf"Sequential: you passed {described}") as info:
        call()
    assert r"torch.randn(1, 3, 224, 224) (its first layer is Conv2d(3, ...)" in str(info.value)
    assert_same_snapshot(before, snapshot(net))
    assert not hasattr(net, "_relucap_records")


def test_calibration_data_of_the_wrong_shape_names_the_batch():
    with pytest.raises(ValueError, match=r"calibrate_caps: data \(batch 0\) does not run through "
                                         r"Sequential: you passed a torch.float32 tensor of "
                                         r"shape \(4, 784\).*torch.randn\(1, 3, 224, 224\)"):
        calibrate_caps(_conv_net(), torch.randn(4, 784))


def test_per_channel_caps_of_the_wrong_length_are_refused_naming_the_site():
    net = _conv_net()
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"cap_relus: cap=\[1.0, 2.0\] gives site '1' a per-channel "
                                         r"cap of 2 entries but its input has shape \(1, 4, 62, "
                                         r"62\); pass cap= one cap per channel \(4\)"):
        cap_relus(net, [1.0, 2.0], inplace=True)
    assert_same_snapshot(before, snapshot(net))
    assert not hasattr(net, "_relucap_records")
    _, report = cap_relus(net, [1.0, 2.0, 3.0, 4.0])
    assert report.count == 2


def test_copy_model_gives_the_copy_its_own_hook_dicts_and_containers():
    """The empty hook dicts copy_model creates inline belong to the copy alone: a hook added
    to the copy never reaches the original, and the memo maps every original module."""
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    memo: dict = {}
    new = copy_model(net, memo)
    for old, fresh in zip(net.modules(), new.modules()):
        assert memo[id(old)] is fresh and fresh is not old
        for key in ("_forward_hooks", "_forward_pre_hooks", "_parameters", "_buffers",
                    "_modules", "_non_persistent_buffers_set"):
            assert getattr(fresh, key) is not getattr(old, key)
    seen = []
    new[2][0].register_forward_hook(lambda m, i, o: seen.append(1))
    net(torch.ones(1, 3))
    assert seen == [] and not net[2][0]._forward_hooks
    new(torch.ones(1, 3))
    assert seen == [1]


def test_self_check_leaves_no_trace_on_a_model_in_training_mode():
    """cap_relus(inplace=True) runs the self-check on the user's own model: BatchNorm's
    running statistics (also of a module registered twice), existing .grad, train/eval modes
    and the global RNG come back exactly as they were."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    net = nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 4), bn,
                        nn.ReLU(), nn.Linear(4, 2))
    net[7].eval()
    net[0].weight.grad = torch.full_like(net[0].weight, 3.0)
    grad = net[0].weight.grad
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    x = torch.randn(5, 3)
    rng = torch.get_rng_state()
    cap_relus(net, 0.5, inplace=True, example_input=x)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net[0].weight.grad is grad and net[4].weight.grad is None
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())
