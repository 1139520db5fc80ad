"""Tests of the surgery self-check, the runtime path and the refusals (issue 13).

Each test named ``test_failure_N_*`` reproduces failure N of issue 13 (silent on the code before
it) and checks the fix. ReLU applications are counted independently of relucap_plugin by
``count_relu_applications`` of test_surgery.py.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relucap_plugin.surgery import (
    ConversionCheckError,
    UntraceableModelError,
    calibrate_caps,
    cap_relus,
    find_relus,
    is_converted,
    uncap,
)
from tests.test_surgery import count_relu_applications, run, snapshot, assert_same_snapshot


class FrozenBranch(nn.Module):
    """A forward with ``torch.no_grad()`` around a functional ReLU (a frozen feature branch)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            h = F.relu(self.frozen(x))
        return self.head(F.relu(h - 0.1) + h)


class Bf16(nn.Module):
    """A forward computing a functional ReLU under autocast: its output is bfloat16."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.relu(self.lin(x))


def _frozen_helper(lin, x):
    with torch.no_grad():
        return torch.relu(lin(x))


class HelperFrozen(nn.Module):
    """The ``with`` block is in a plain function: no method of the class shows it, so only the
    self-check can see what an fx rewrite would lose."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_frozen_helper(self.a, x).relu())


def grads_of(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x.clone().requires_grad_())
    out.float().sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}, out


def test_failure_1_context_managers_kept_by_runtime_path():
    torch.manual_seed(0)
    x = torch.randn(5, 4) * 3
    for net in (FrozenBranch(), Bf16()):
        names, reference = grads_of(net, x)
        expected = count_relu_applications(net, x)
        plain, report = cap_relus(net, math.inf, example_input=x)
        assert set(report.how.values()) == {"runtime"} and report.method == "runtime"
        assert all("`with` block" in why for why in report.reasons.values())
        assert report.check.startswith("passed")
        got_names, out = grads_of(plain, x)
        assert got_names == names and out.dtype == reference.dtype
        assert torch.equal(out, reference)
        capped, report = cap_relus(net, 0.5, example_input=x)
        assert report.count == expected
        seen = []
        for path in set(report.paths.values()):
            capped.get_submodule(path).register_forward_hook(
                lambda m, i, o, seen=seen: seen.append(float(o.max())))
        run(capped, x)
        assert len(seen) == expected and max(seen) <= 0.5
    assert "frozen.weight" not in grads_of(FrozenBranch(), x)[0]


def test_failure_1_self_check_catches_what_fx_loses_and_falls_back():
    torch.manual_seed(0)
    net = HelperFrozen()
    x = torch.randn(3, 4)
    names, reference = grads_of(net, x)
    assert "a.weight" not in names
    converted, report = cap_relus(net, math.inf, example_input=x)
    assert set(report.how.values()) == {"runtime"}
    assert all("fx rewrite failed the self-check" in r for r in report.reasons.values())
    assert grads_of(converted, x)[0] == names
    assert torch.equal(run(converted, x), run(net, x))


def test_failure_2_scripted_submodules_are_refused():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.lin(x))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), torch.jit.script(Inner()))
    before = snapshot(net)
    for call in (lambda: cap_relus(net, 0.5), lambda: find_relus(net),
                 lambda: cap_relus(net, 0.5, mode="modules")):
        with pytest.raises(TypeError, match=r"submodule '2' .* TorchScript .*eager module at '2'"):
            call()
    assert_same_snapshot(before, snapshot(net))


class Mixed(nn.Module):
    """One ReLU module and one functional ReLU."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return F.relu(self.act(self.lin(x)) - 0.5)


def test_failure_3_modules_mode_refuses_to_miss_functional_relus():
    net = Mixed()
    x = torch.randn(3, 4)
    for inplace in (False, True):
        model = copy.deepcopy(net)
        with pytest.raises(ConversionCheckError, match=r"1 ReLU application\(s\) were not "
                           r"converted.*test_surgery_checks.py:\d+ in forward.*mode='auto'"):
            cap_relus(model, 0.5, mode="modules", inplace=inplace)
        assert not is_converted(model) and type(model.act) is nn.ReLU
        assert "forward" not in model.__dict__
    converted, report = cap_relus(net, 0.5)
    assert report.count == 2 == count_relu_applications(net, x)


def test_failure_3_untraceable_message_no_longer_suggests_fx_wrap():
    class Gate(nn.Module):
        def forward(self, x):
            return F.relu(x) if x.sum() > 0 else -x

    with pytest.raises(UntraceableModelError) as info:
        find_relus(nn.Sequential(nn.Linear(2, 2), Gate()))
    assert "torch.fx.wrap" not in str(info.value)


def test_failure_4_torch_compile_wrappers_are_refused():
    net = Mixed()
    with pytest.raises(TypeError, match=r"torch.compile wrapper; pass model._orig_mod"):
        cap_relus(torch.compile(net), 0.5)
    outer = nn.Sequential(nn.Linear(4, 4), torch.compile(Mixed()))
    with pytest.raises(TypeError, match=r"submodule '1' .*torch.compile wrapper"):
        find_relus(outer)


class KeywordAct(Mixed):
    """Calls its ReLU module with a keyword argument, as some models do."""

    def forward(self, x):
        return self.act(input=self.lin(x))


@pytest.mark.parametrize("mode", ["auto", "modules"])
def test_failure_5_keyword_call_of_activation_module(mode):
    torch.manual_seed(0)
    net = KeywordAct()
    x = torch.randn(6, 4) * 4
    plain, report = cap_relus(net, math.inf, mode=mode)
    assert torch.equal(run(plain, x), run(net, x)) and report.count == 1
    capped, _ = cap_relus(net, 0.25, mode=mode)
    out = run(capped, x)
    assert float(out.max()) <= 0.25 and float(out.max()) > 0


def test_failure_7_uncopyable_model_points_to_inplace():
    net = KeywordAct()
    net.lock = threading.Lock()
    with pytest.raises(TypeError, match=r"cannot be deep-copied.*inplace=True"):
        cap_relus(net, 0.5)
    model, report = cap_relus(net, 0.5, inplace=True)
    assert model is net and report.count == 1
    uncap(net)
    assert type(net.act) is nn.ReLU


class Twice(nn.Module):
    """A block with a `with` block, called twice by its parent."""

    def __init__(self):
        super().__init__()
        self.block = FrozenBranch()
        self.proj = nn.Linear(3, 4)

    def forward(self, x):
        return self.block(self.proj(self.block(x)))


def test_runtime_path_shared_owner_pickles_copies_and_undoes():
    torch.manual_seed(0)
    net = Twice().eval()
    x = torch.randn(3, 4) * 3
    reference = run(net, x)
    capped, report = cap_relus(net, 0.2, example_input=x)
    assert report.count == 4 and set(report.how.values()) == {"runtime"}
    assert len(set(report.paths.values())) == 2  # one activation per call site
    out = run(capped, x)
    buffer = io.BytesIO()
    torch.save(capped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(run(loaded, x), out) and torch.equal(run(copy.deepcopy(capped), x), out)
    assert not torch.equal(out, reference)
    uncap(capped)
    assert torch.equal(run(capped, x), reference) and "forward" not in capped.block.__dict__
    with pytest.raises(ValueError, match=r"must be capped at run time .*different activations"):
        cap_relus(net, {"block:relu#0": 0.2, "block:relu#2": 0.3})


def test_self_check_without_input_is_reported():
    class NoLayer(nn.Module):
        def forward(self, x):
            return F.relu(x)

    with pytest.warns(UserWarning, match="not self-checked: no example_input"):
        _, report = cap_relus(NoLayer(), 0.5)
    assert report.check.startswith("not run: no example_input")
    _, report = cap_relus(NoLayer(), 0.5, example_input=torch.randn(2, 3))
    assert "bit-identical" in report.check


class Gate(Mixed):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x):
        h = self.act(self.lin(x))
        if h.sum() > 0:
            h = F.relu(h - 0.5) + torch.relu(-h)
        return h.relu()


def test_untraceable_model_found_by_running_and_capped_at_run_time():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 4) * 3
    with pytest.raises(UntraceableModelError, match="example_input=x"):
        find_relus(net)
    sites = find_relus(net, x)
    assert [s.name for s in sites] == ["1.act", "1:relu#0", "1:relu#1", "1:relu#2"]
    assert sites[1].shape == (5, 4) and sites[2].op == "torch.relu"
    expected = count_relu_applications(net, x)
    assert expected == 4
    plain, report = cap_relus(net, math.inf, example_input=x)
    assert torch.equal(run(plain, x), run(net, x)) and report.count == 4
    capped, report = cap_relus(net, 0.5, sites="1:*", example_input=x)
    assert report.how == {f"1:relu#{k}": "runtime" for k in range(3)}
    assert all("fx cannot trace" in r for r in report.reasons.values())
    outputs = []
    capped[1].register_forward_hook(lambda m, i, o: outputs.append(o))
    run(capped, x)
    assert float(outputs[0].max()) <= 0.5


def _bf16_helper(lin, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.relu(lin(x))


class HelperBf16(nn.Module):
    """The autocast block is in a plain function: an fx rewrite of ``forward`` inlines it
    without the block, and only the self-check's dtype comparison can tell."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return _bf16_helper(self.a, x).relu()


def test_failure_1_self_check_catches_a_lost_autocast_and_falls_back():
    torch.manual_seed(0)
    net = HelperBf16()
    x = torch.randn(3, 4)
    reference = run(net, x)
    assert reference.dtype == torch.bfloat16
    converted, report = cap_relus(net, math.inf, example_input=x)
    assert set(report.how.values()) == {"runtime"}
    assert all("fx rewrite failed the self-check" in r for r in report.reasons.values())
    out = run(converted, x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)


class _SharedAct(nn.Module):
    """One ReLU instance called twice; its calls can get different caps (fx route)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.a(x))) + self.act(x)


@pytest.mark.parametrize("inplace", [False, True])
def test_hooks_on_a_swapped_relu_keep_firing_and_their_handles_keep_working(inplace):
    """A forward hook recording a ReLU's output (as users do to calibrate caps) fires on the
    new activation after the swap, sees the capped output, and its handle still removes it;
    undo puts the ReLU back with exactly its own hooks. Before, the hook was dropped without a
    word and the self-check passed."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    handle = net[1].register_forward_hook(lambda m, i, o: seen.append((type(m), float(o.detach().max()))))
    converted, report = cap_relus(net, 0.1, inplace=inplace)
    seen.clear()
    converted(torch.randn(16, 4) * 10)
    assert len(seen) == 1 and seen[0][0] is not nn.ReLU and seen[0][1] == pytest.approx(0.1)
    if inplace:
        handle.remove()
        seen.clear()
        converted(torch.randn(2, 4))
        assert seen == []
        report.undo()
        assert type(net[1]) is nn.ReLU and len(net[1]._forward_hooks) == 0
    else:
        assert type(net[1]) is nn.ReLU and len(net[1]._forward_hooks) == 1


def test_an_output_changing_hook_on_a_swapped_relu_is_kept_exactly():
    """A hook that returns a new output (scales the activation) stays part of the model: the
    converted model computes hook(capped ReLU). Before, the check refused the model, blaming a
    regenerated forward that did not exist."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[1].register_forward_hook(lambda m, i, o: 2 * o)
    pre = []
    net[1].register_forward_pre_hook(lambda m, args: pre.append(args[0].shape))
    net[1].register_full_backward_hook(lambda m, gi, go: pre.append("backward"))
    converted, report = cap_relus(net, 0.1)
    assert report.check.startswith("passed")
    x = torch.randn(5, 4, requires_grad=True) * 10
    pre.clear()
    out = converted(x)
    assert torch.equal(out, converted[2](2 * net[0](x).clamp(0, 0.1)))
    out.sum().backward()
    assert pre == [torch.Size([5, 8]), "backward"]


def test_hooks_of_a_shared_relu_fire_once_per_call_when_its_calls_get_different_caps():
    net = _SharedAct()
    calls = []
    net.act.register_forward_hook(lambda m, i, o: calls.append(float(o.detach().max())))
    converted, report = cap_relus(net, {"act#0": 0.1, "act#1": 0.5})
    assert set(report.how.values()) == {"fx"}
    calls.clear()
    converted(torch.randn(8, 4) * 10)
    assert len(calls) == 2 and sorted(calls) == pytest.approx([0.1, 0.5])


def test_a_keyword_call_of_a_relu_with_a_pre_hook_still_runs_and_leaves_the_original_alone():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(input=self.lin(x))

    net = Keyword()
    got = []
    net.act.register_forward_pre_hook(lambda m, args: got.append(len(args)))
    converted, report = cap_relus(net, 0.1)
    got.clear()
    out = converted(torch.randn(3, 4) * 10)
    assert bool(out.max() <= torch.tensor(0.1)) and got == [1]
    assert len(net.act._forward_pre_hooks) == 1 and type(net.act) is nn.ReLU
    got.clear()
    net(torch.randn(3, 4))
    assert got == [0]


def test_a_module_swap_that_changes_outputs_is_blamed_on_the_swap_not_on_a_rewrite():
    """Code that inspects its activation module (its type) computes something else once the
    ReLU is swapped: the check refuses, and says so (no forward was regenerated)."""

    class Inspects(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            y = self.act(self.lin(x))
            return y if type(self.act) is nn.ReLU else 2 * y

    with pytest.raises(ConversionCheckError, match=r"every site was a module swap, so the "
                                                   r"model's code depends on the activation"):
        cap_relus(Inspects(), 0.1)


def test_a_hook_added_to_the_new_activation_is_a_whole_hook_on_the_relu_after_undo():
    """Hooks registered on the capped activation later (with kwargs, always called) land on
    the ReLU whole when the conversion is undone: the hook dicts move as a group."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    net[1].register_forward_hook(lambda m, i, o: None)
    _, report = cap_relus(net, 0.1, inplace=True)
    got = []
    net[1].register_forward_hook(lambda m, args, kwargs, o: got.append(len(kwargs)),
                                 with_kwargs=True, always_call=True)
    report.undo()
    assert type(net[1]) is nn.ReLU
    net(torch.randn(2, 4))
    assert got == [0]


#: The self-check's refusal of a converted site applied through an unreachable reference.
UNREACHABLE_SITE = (r"1 ReLU application\(s\) of the converted sites should run through their "
                    r"new activations at cap=inf, 0 did; the model applies a ReLU module that "
                    r"is not in its module tree")


class _Bypass(nn.Module):
    """Calls its registered ReLU ``act`` through another reference: a list, a partial, a
    closure. A swap replaces the registered attribute only."""

    def __init__(self, how: str):
        super().__init__()
        self.lin, self.act, self.out = nn.Linear(4, 4), nn.ReLU(), nn.ReLU()
        act = self.act
        self.call = {"list": [act], "partial": functools.partial(act),
                     "closure": lambda x: act(x)}[how]

    def forward(self, x):
        call = self.call[0] if isinstance(self.call, list) else self.call
        return self.out(call(self.lin(x)))


@pytest.mark.parametrize("how", ["list", "partial"])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_site_applied_through_a_reference_the_swap_cannot_reach_is_refused(how, inplace):
    """Converting only ``act``: the model still applies the old ReLU through the other
    reference. Before, the check passed ("0 through new activations") and the site stayed
    uncapped; now the conversion is refused and the model is left as it was."""
    net = _Bypass(how)
    before = snapshot(net)
    with pytest.raises(ConversionCheckError, match=UNREACHABLE_SITE):
        cap_relus(net, 0.1, sites="act", inplace=inplace)
    assert_same_snapshot(before, snapshot(net))
    assert type(net.act) is nn.ReLU and not is_converted(net)
    _, report = cap_relus(net, 0.1, sites="out")  # a site reached through its attribute
    assert report.count == 1 and report.check.startswith("passed")


@pytest.mark.parametrize("example", [False, True])
def test_a_relu_called_through_a_closure_is_never_left_plain_in_a_returned_model(example):
    """A closure holding the ReLU (``deepcopy`` shares it with the original, so the copy calls
    the original's module): every way of converting is refused loudly."""
    net = _Bypass("closure")
    x = torch.randn(2, 4) if example else None
    for sites in (None, "act"):
        with pytest.raises((ConversionCheckError, UntraceableModelError, ValueError)):
            cap_relus(net, 0.1, sites=sites, example_input=x)
    with pytest.raises(ConversionCheckError, match="not in its module tree"):
        cap_relus(net, 0.1, sites="act", example_input=x, inplace=True)
    assert type(net.act) is nn.ReLU and not is_converted(net)


class _ClampRelu(nn.Module):
    """A ReLU module, a ReLU written as ``clamp(min=0)``, a threshold ReLU, and clamps that are
    not ReLUs (an input clamp to [0, 1], a clamp with a lower bound of 0.5)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        x = x.clamp(0, 1)
        h = self.act(self.a(x))
        h = self.b(h).clamp(min=0) + torch.clamp(h, min=0.5)
        return self.c(F.threshold(h - 0.1, 0.0, 0.0))


def test_relus_written_as_clamp_or_threshold_are_named_not_silently_left_plain():
    """cap_relus caps nn.ReLU/F.relu forms; the two ReLUs written as clamp(min=0) and
    threshold(x, 0, 0) are named in a warning (they stay uncapped), and a model whose only
    ReLUs are written that way gets an error naming them instead of "applies no ReLU"."""
    net = _ClampRelu()
    with pytest.warns(UserWarning, match=r"cap_relus: 2 ReLU application\(s\) written as "
                                         r"clamp\(min=0\), threshold\(x, 0, 0\), .* are not "
                                         r"sites and stay uncapped: in the model itself "
                                         r"\(_ClampRelu\)"):
        _, report = cap_relus(net, 0.1)
    assert report.count == 1 and any("clamp(min=0)" in w for w in report.warnings)
    with pytest.warns(UserWarning, match=r"find_relus: 2 ReLU application\(s\) written as"):
        assert [s.name for s in find_relus(net)] == ["act"]
    only = nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(0, 1), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"applies no ReLU in its forward pass.*Hardtanh"):
        cap_relus(only, 0.1)

    class OnlyClamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).clamp_min(0)

    with pytest.raises(ValueError, match=r"applies no ReLU in its forward pass.*1 ReLU "
                                         r"application\(s\) written as clamp\(min=0\)"):
        cap_relus(OnlyClamp(), 0.1)


class _OtherRelus(nn.Module):
    """A ReLU module next to ReLUs written as maximum with zeros, leaky_relu with slope 0,
    hardtanh(x, 0, inf) and aten's relu op; and look-alikes that are not ReLUs: max over a
    dimension, maximum with a nonzero, leaky_relu with its default slope, ReLU6."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        z = self.a(x)
        h = (self.act(z) + torch.maximum(input=z, other=torch.zeros(()))
             + torch.max(z, torch.zeros_like(z))
             + F.leaky_relu(z, 0.0) + F.hardtanh(z, 0.0, float("inf")) + torch.ops.aten.relu(z)
             + torch.ops.aten.relu.default(z))
        noise = (torch.max(h, 1).values.sum() + torch.maximum(h, torch.ones(())).sum()
                 + F.leaky_relu(h).sum() + F.relu6(h).sum())
        return self.b(h) + 0 * noise


def test_relus_written_as_maximum_leaky_relu_hardtanh_or_aten_ops_are_named():
    """Each of the six other ReLU forms of _OtherRelus is named once (the look-alikes are
    not), the ReLU module is capped, and the output of the converted model shows that the
    named ones really do stay uncapped. (A zero tensor as large as the other operand of a
    maximum counts where it removed a negative value: the input has 64 rows.)"""
    net = _OtherRelus()
    with pytest.warns(UserWarning, match=r"cap_relus: 6 ReLU application\(s\) written as .*"
                                         r"maximum\(x, 0\), leaky_relu\(x, 0\), hardtanh\(x, 0, "
                                         r"inf\) or torch.ops.aten.relu are not sites"):
        converted, report = cap_relus(net, 0.1, example_input=torch.randn(64, 4))
    assert report.count == 2  # act, and the F.relu6 (a ReLU6 site)
    x = torch.randn(16, 4) * 20
    inner = []
    converted.b.register_forward_pre_hook(lambda m, args: inner.append(args[0]))
    converted(x)
    # six uncapped ReLUs of z and one capped at 0.1: far above 7 * 0.1
    assert inner[0].max() > 10
    only = nn.Sequential(nn.Linear(4, 4))
    only.forward = lambda x: torch.ops.aten.relu(only[0](x))
    with pytest.raises(ValueError, match=r"applies no ReLU in its forward pass.*1 ReLU "
                                         r"application\(s\) written as"):
        find_relus(only)


@pytest.mark.parametrize("spec", ["dynamic_capped_relu", "learnable_capped_relu(cap=0.3)",
                                  "spatial_attention_relu"])
def test_a_model_already_holding_our_activations_gets_its_other_relus_capped(spec):
    """These activations apply F.relu inside themselves: not a site, and no plain ReLU left
    over either (the check used to refuse the whole model for it)."""
    from relucap_plugin import create_activation

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), create_activation(spec), nn.Conv2d(8, 8, 3),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    converted, report = cap_relus(net, 0.25)
    assert list(report.replaced) == ["3"] and report.check.startswith("passed")
    assert type(converted[1]) is type(net[1])
    x = torch.randn(2, 3, 12, 12) * 10
    h = converted[2](converted[1](converted[0](x)))
    assert torch.equal(converted[3](h), F.relu(h).clamp(max=0.25))
    assert torch.equal(converted(x), net[4:](F.relu(net[2](net[1](net[0](x)))).clamp(max=0.25)))


def test_sites_found_on_another_input_are_checked_without_counting_but_bypasses_still_fail():
    """Sites from ``find_relus`` on a larger input than the self-check's: a loop whose length
    depends on the input size applies the ReLU another number of times, which is no error; a
    swapped-out ReLU that still runs (through a partial) is one, whatever the input."""

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.pool = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)

        def forward(self, x):
            while x.shape[-1] > 4:
                x = self.pool(self.act(self.conv(x)))
            return x.mean((2, 3))

    net = Loop().eval()
    sites = find_relus(net, torch.randn(1, 3, 64, 64))
    assert len(sites) == 4
    converted, report = cap_relus(net, 0.1, sites=sites)  # checked at 32x32: 3 applications
    assert report.check.startswith("passed") and report.count == 4
    bypass = _Bypass("partial")
    with pytest.raises(ConversionCheckError, match=r"2 ReLU application\(s\) of the converted "
                                                   r"sites should run through their new "
                                                   r"activations at cap=inf, 1 did; the model "
                                                   r"applies a ReLU module that is not in its"):
        cap_relus(bypass, 0.1, sites=find_relus(bypass, torch.randn(2, 4)))


def test_a_model_with_lazy_modules_not_yet_run_is_copied_and_converted():
    """An uninitialized lazy parameter has no storage: the copy used to fail on it and
    blame deepcopy (which copies it). The original stays lazy."""
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2), nn.LazyLinear(3))
    x = torch.randn(5, 4)
    converted, report = cap_relus(net, 0.1, example_input=x)
    assert report.check.startswith("passed")
    assert type(net[0]) is nn.LazyLinear and isinstance(net[0].weight, nn.parameter.UninitializedParameter)
    assert bool(converted[1](converted[0](x)).max() <= torch.tensor(0.1))


class _ThroughAList(nn.Module):
    """Applies its registered ReLU through a plain Python list."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.act = nn.ReLU()
        self.acts = [self.act]

    def forward(self, x):
        return self.b(self.acts[0](self.a(x)))


def test_calibration_self_checks_its_recorders_like_any_conversion():
    """calibrate_caps installs its recorders through the same self-checked conversion as
    cap_relus: a ReLU its recorder cannot reach is refused with the reason (it used to give
    cap=inf with a 'no positive output' warning), and a model it can reach calibrates to the
    quantile of the real activations, its original untouched."""
    data = torch.randn(64, 4)
    with pytest.raises(ConversionCheckError, match="calibrate_caps: .*not in its module tree"):
        calibrate_caps(_ThroughAList(), data)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = snapshot(net)
    caps = calibrate_caps(net, data, quantile=1.0)
    with torch.no_grad():
        h1 = F.relu(net[0](data))
        h2 = F.relu(net[2](h1))
    assert caps == {"1": float(h1.max()), "3": float(h2.max())}
    assert_same_snapshot(before, snapshot(net))


def test_undo_over_a_module_changed_after_conversion_says_what_it_overwrote():
    """uncap/report.undo put the original ReLU back; where the user had replaced the capped
    module since, that edit is lost, and they are told so (not where nothing was changed)."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    converted, report = cap_relus(net, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.undo()
    assert type(converted[1]) is nn.ReLU
    converted, _ = cap_relus(net, 0.1)
    converted[1] = nn.Identity()
    with pytest.warns(UserWarning, match=r"Sequential.1 \(Identity\) held a module cap_relus "
                                         r"did not install, and that change is gone"):
        uncap(converted)
    assert type(converted[1]) is nn.ReLU and not is_converted(converted)
