"""The shortcuts that make cap_relus cheap (issue 13, trace cost) do not hide a failure.

- The self-check runs without autograd when every site is a whole-module swap, and with
  autograd (the parameters gradients reach compared) as soon as a forward is regenerated or
  wrapped.
- Synthesised input sizes below what a failing conv/pooling layer needs are skipped.
- The model copy stays independent of the original and keeps shared storages shared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relucap_plugin.surgery.verify as verify
from relucap_plugin.surgery import ConversionCheckError, cap_relus, find_relus
from relucap_plugin.surgery._copy import copy_model
from tests.test_surgery import assert_same_snapshot, count_relu_applications, run, snapshot
from tests.test_surgery_checks import UNREACHABLE_SITE, HelperFrozen, grads_of


class _Modules(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.relu(self.a(x)))


class _Aliased(_Modules):
    """Calls its ReLU through a plain list attribute: a module swap at ``relu`` leaves the
    forward calling the old, uncapped module (silent without the check's ReLU count)."""

    def __init__(self):
        super().__init__()
        self.__dict__["acts"] = [self.relu]

    def forward(self, x):
        return self.b(self.acts[0](self.a(x)))


class _Functional(_Modules):
    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def _count_gradient_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = verify.add_gradients
    monkeypatch.setattr(verify, "add_gradients",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_module_swaps_are_checked_without_autograd(monkeypatch):
    calls = _count_gradient_passes(monkeypatch)
    x = torch.randn(3, 4)
    _, report = cap_relus(_Modules(), 0.5, example_input=x)
    assert report.method == "modules" and calls == []
    assert "gradients not compared (no forward regenerated or wrapped)" in report.check
    assert "bit-identical outputs" in report.check


def test_the_check_without_autograd_still_catches_a_swap_the_forward_bypasses():
    torch.manual_seed(0)
    net = _Aliased()
    x = torch.randn(3, 4)
    before = snapshot(net)
    with pytest.raises(ConversionCheckError, match=UNREACHABLE_SITE):
        cap_relus(net, 0.5, example_input=x)
    with pytest.raises(ConversionCheckError, match=r"not in its module tree"):
        cap_relus(net, 0.5)  # synthesised input: the same
    with pytest.raises(ConversionCheckError):
        cap_relus(net, 0.5, example_input=x, inplace=True)
    assert_same_snapshot(before, snapshot(net))
    assert "relucap" not in "".join(net.__dict__)


@pytest.mark.parametrize("net", [_Functional, HelperFrozen], ids=["fx", "fx-then-runtime"])
def test_a_regenerated_or_wrapped_forward_gets_the_gradient_comparison(monkeypatch, net):
    calls = _count_gradient_passes(monkeypatch)
    torch.manual_seed(0)
    net = net()
    x = torch.randn(3, 4)
    converted, report = cap_relus(net, math.inf, example_input=x)
    assert report.method in ("fx", "runtime") and calls == [1]
    assert "gradients reach the same" in report.check
    assert grads_of(converted, x)[0] == grads_of(net, x)[0]


def test_a_gradient_check_without_a_reference_with_gradients_is_refused():
    """``check`` asked to compare gradients against a reference pass made without autograd
    refuses loudly (the decision to add gradients is made before converting)."""
    net = _Modules()
    x = torch.randn(3, 4)
    ref = verify.probe(net, (x,))
    assert ref.grads is None
    with pytest.raises(ConversionCheckError, match="ran without autograd, so gradients cannot be compared"):
        verify.check(net, ref, (x,), {}, False, "cap_relus", True)
    verify.add_gradients(net, ref, (x,), "cap_relus")
    summary, _ = verify.check(net, ref, (x,), {}, False, "cap_relus", True)
    assert "gradients reach the same 4 parameters" in summary


def test_a_lost_no_grad_is_caught_only_by_the_gradient_comparison(monkeypatch):
    """HelperFrozen's fx rewrite loses a ``no_grad`` block and changes nothing else: with
    the gradient comparison skipped the check would pass it (fx kept, the frozen layer now
    trained); as it is, the check fails the rewrite and the run-time path takes over."""
    torch.manual_seed(0)
    net = HelperFrozen()
    x = torch.randn(3, 4)
    monkeypatch.setattr(verify, "add_gradients", lambda *a, **k: None)
    monkeypatch.setattr("relucap_plugin.surgery.convert._forwards_changed", lambda c: False)
    converted, report = cap_relus(net, math.inf, example_input=x)
    assert set(report.how.values()) == {"fx"}  # what the shortcut alone would return
    assert "a.weight" in grads_of(converted, x)[0] and "a.weight" not in grads_of(net, x)[0]
    monkeypatch.undo()
    converted, report = cap_relus(net, math.inf, example_input=x)
    assert set(report.how.values()) == {"runtime"}
    assert grads_of(converted, x)[0] == grads_of(net, x)[0]


class _Shrinks(nn.Module):
    """Runs from input size ``least`` up: a stride-4 conv, then a ``kernel``-wide valid conv."""

    def __init__(self, kernel: int, custom_failure: bool = False):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, stride=4)
        self.relu = nn.ReLU()
        self.wide = nn.Conv2d(4, 4, kernel)
        self.custom_failure = custom_failure
        self.kernel = kernel

    def forward(self, x):
        h = self.relu(self.first(x))
        if self.custom_failure and h.shape[-1] < self.kernel:
            raise ValueError("too small for this block")
        return self.wide(h).mean((2, 3))


def _sizes_tried(model) -> tuple[list[int], int | None]:
    tried = []

    def probe(m, args):
        tried.append(args[0].shape[-1])
        return verify.probe(m, args)

    args, _, _ = verify._first_that_runs(model, probe)
    return tried, None if args is None else args[0].shape[-1]


def test_synthesised_sizes_the_failing_layer_cannot_take_are_skipped(monkeypatch):
    # the order of a model of 10 M parameters or more (_Shrinks is tiny: counted as large here)
    monkeypatch.setattr(verify, "SMALL_MODEL", 0)
    # at 32 the wide conv gets 8x8: a 20-wide kernel needs 32 * 20 / 8 = 80, so 64 is skipped
    assert _sizes_tried(_Shrinks(20)) == ([32, 96], 96)
    # a 12-wide kernel needs 48: 64 is the next size, and it runs
    assert _sizes_tried(_Shrinks(12)) == ([32, 64], 64)
    # a failure in the model's own code says nothing about sizes: every size in order
    assert _sizes_tried(_Shrinks(20, custom_failure=True)) == ([32, 64, 96], 96)
    # no size up to 224 can feed a 200-wide kernel after a stride of 4: one try, no input
    assert _sizes_tried(_Shrinks(200)) == ([32], None)
    _assert_unchecked_after_one_try(32, "64, 96, 224, 28")


def test_a_small_conv_model_is_tried_at_64_first_then_at_the_other_sizes():
    """Under SMALL_MODEL parameters 64 comes before 32 (a forward costs about the same at
    both); the sizes a failing layer cannot take are still skipped, 32 included."""
    assert sum(p.numel() for p in _Shrinks(20).parameters()) < verify.SMALL_MODEL
    # at 64 the wide conv gets 16x16: a 20-wide kernel needs 64 * 20 / 16 = 80: 32 is skipped
    assert _sizes_tried(_Shrinks(20)) == ([64, 96], 96)
    assert _sizes_tried(_Shrinks(12)) == ([64], 64)
    assert _sizes_tried(_Shrinks(20, custom_failure=True)) == ([64, 32, 96], 96)
    # a model that runs at 32 only (a Linear after a flatten, CIFAR style) still gets 32
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 32 * 32, 10))
    assert _sizes_tried(flat) == ([64, 32], 32)
    # at 10 M parameters or more the order is 32 first
    big = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, verify.SMALL_MODEL // 4))
    assert _sizes_tried(big) == ([32], 32)
    _assert_unchecked_after_one_try(64, "32, 96, 224, 28")


def _assert_unchecked_after_one_try(size: int, skipped: str) -> None:
    """cap_relus on _Shrinks(200): one size tried, the others skipped, returned unchecked."""
    with pytest.warns(UserWarning, match="not self-checked"):
        _, report = cap_relus(_Shrinks(200), 0.5)
    assert report.check.startswith(
        f"not run: no example_input, and the synthesised inputs (1, 3, {size}, {size}) "
        f"(RuntimeError) do not run (sizes {skipped} skipped: a conv/pooling layer needs an "
        "input of about 800); pass example_input")


def test_cap_relus_converts_at_the_size_found_and_checks_it():
    torch.manual_seed(0)
    net = _Shrinks(20).eval()
    converted, report = cap_relus(net, 0.25)
    assert report.check.startswith("passed") and report.count == 1
    x = torch.randn(2, 3, 96, 96)
    assert count_relu_applications(net, x) == 1
    h = F.relu(net.first(x)).clamp(max=0.25)
    assert torch.equal(run(converted, x), net.wide(h).mean((2, 3)))


def test_the_copy_is_independent_of_the_original():
    """Training the copy leaves the original's state bit-identical; attributes are not
    shared; a tensor attribute viewing a buffer still views the copy's buffer."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.relu = nn.ReLU()
            self.register_buffer("table", torch.arange(8.0))
            self.window = self.table[2:6]  # a plain attribute sharing the buffer's storage
            self.settings = {"scales": [1.0, 2.0]}

        def forward(self, x):
            return self.relu(self.bn(self.lin(x))) * self.window

    torch.manual_seed(0)
    net = Net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    new = copy_model(net)
    assert new.window.untyped_storage().data_ptr() == new.table.untyped_storage().data_ptr()
    assert new.table.untyped_storage().data_ptr() != net.table.untyped_storage().data_ptr()
    new.settings["scales"].append(3.0)
    assert net.settings == {"scales": [1.0, 2.0]}
    optimizer = torch.optim.SGD(new.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        new(torch.randn(8, 4)).sum().backward()
        optimizer.step()
    with torch.no_grad():
        new.table.add_(1)
    assert torch.equal(new.window, torch.arange(3.0, 7.0))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(new.lin.weight, net.lin.weight)


class _InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x.relu_())


def test_an_input_that_needs_no_grad_is_refused_where_gradients_are_compared():
    net = _InPlaceInput()
    x = torch.randn(3, 4)
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"cap_relus: the self-check's input runs through "
                                         r"_InPlaceInput under no_grad but not with autograd "
                                         r"\(RuntimeError: .*Pass an example_input that runs"):
        cap_relus(net, 0.5, example_input=x, inplace=True)
    assert_same_snapshot(before, snapshot(net))
    assert not hasattr(net, "_relucap_records")


class _RareGate(nn.Module):
    """Applies its ReLU only on inputs no synthesised input reaches."""

    def forward(self, x):
        return F.relu(x) if x.sum() > 1e6 else -x


@pytest.mark.parametrize("fn", ["find_relus", "cap_relus"])
def test_a_module_branching_on_a_value_is_traced_even_if_the_run_applied_no_relu(fn):
    """Discovery by running keeps modules in which the run applied no ReLU whole; one that
    read a tensor value may apply one on another input, so fx must look inside it (and
    refuse, loudly, instead of a conversion that misses the gate's ReLU)."""
    from relucap_plugin.surgery import UntraceableModelError, find_relus

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), _RareGate())
    call = (lambda: find_relus(net)) if fn == "find_relus" else (lambda: cap_relus(net, 0.5))
    with pytest.raises(UntraceableModelError, match="_RareGate"):
        call()


def test_the_garbage_collector_is_paused_only_inside_surgery_and_left_as_it_was():
    """cap_relus and find_relus pause cyclic garbage collection while they run (their
    objects trigger dozens of collections): enabled again afterwards, also when they raise,
    and left paused where the caller had paused it."""
    import gc

    seen = []
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].register_forward_hook(lambda m, i, o: seen.append(gc.isenabled()))
    assert gc.isenabled()
    find_relus(net)
    cap_relus(net, 0.5)
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(TypeError, match="cap is required"):
        cap_relus(net, None)
    assert gc.isenabled()
    gc.disable()
    try:
        cap_relus(net, 0.5)
        assert not gc.isenabled()
    finally:
        gc.enable()


class _TokenNet(nn.Module):
    """A model of token ids taking keyword arguments, as text models do."""

    def __init__(self):
        super().__init__()
        self.emb, self.act, self.out = nn.Embedding(10, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, input_ids=None, scale=1.0, mask=None):
        h = self.act(self.emb(input_ids)) * scale
        if mask is not None:
            h = h * mask[..., None]
        return self.out(h.mean(1))


def test_token_models_are_checked_with_synthesised_ids_or_a_dict_of_keyword_arguments():
    """An Embedding-first model gets token ids synthesised (its conversion used to be returned
    unchecked: a float input of the first Linear's width cannot run); example_input may be a
    dict of the forward's keyword arguments; a key the forward does not take is named."""
    torch.manual_seed(0)
    net = _TokenNet()
    _, report = cap_relus(net, 0.5)
    assert report.check.startswith("passed")
    ids, mask = torch.randint(0, 10, (3, 5)), torch.ones(3, 5)
    sites = find_relus(net, example_input={"input_ids": ids, "mask": mask})
    assert [s.shape for s in sites] == [(3, 5, 8)]
    converted, report = cap_relus(net, 0.5, example_input={"input_ids": ids, "mask": mask})
    assert report.check.startswith("passed")
    h = F.relu(net.emb(ids)).clamp(max=0.5) * mask[..., None]
    assert torch.equal(converted(input_ids=ids, mask=mask), net.out(h.mean(1)))
    with pytest.raises(ValueError, match=r"example_input is a dict whose keys \['ids'\] are not "
                                         r"positional parameters of _TokenNet.forward"):
        cap_relus(net, 0.5, example_input={"ids": ids})
    with pytest.raises(ValueError, match=r"torch.randint\(0, 10, \(1, 8\).*Embedding\(10, 8\)"):
        cap_relus(net, 0.5, example_input=torch.randn(3, 8))
