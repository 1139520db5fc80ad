"""Values, gradients, kink convention, dtypes, scripting/compile/ONNX and state of the activations."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from relucap_plugin import (
    CappedReLU,
    DynamicCappedReLU,
    LearnableCappedReLU,
    PReLU,
    PSiLU,
    PSoftplus,
    PSSiLU,
    SpatialAttentionReLU,
    capped_relu,
    create_activation,
    list_activations,
    share_parameters,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def reference_cap(x, cap):
    """min(max(x, 0), cap) computed in float64 by hand."""
    x = x.double()
    cap = torch.as_tensor(cap, dtype=torch.float64)
    if cap.dim() == 1:
        cap = cap.view([1, -1] + [1] * (x.dim() - 2))
    return torch.minimum(torch.maximum(x, torch.zeros(())), cap)


def all_modules():
    """One instance of every activation flavour, with non-default parameters where they exist."""
    mods = {
        "capped": CappedReLU(0.3),
        "capped_inf": CappedReLU(math.inf),
        "capped_channels": CappedReLU(torch.tensor([0.1, 0.5, 2.0])),
        "learnable": LearnableCappedReLU(0.4),
        "learnable_channels": LearnableCappedReLU(0.4, num_channels=3),
        "dynamic": DynamicCappedReLU(quantile=0.9),
        "dynamic_channels": DynamicCappedReLU(quantile=0.9, num_channels=3),
        "prelu": PReLU(alpha=0.1),
        "psoftplus": PSoftplus(alpha=2.0),
        "psilu": PSiLU(alpha=1.5),
        "pssilu": PSSiLU(alpha=1.5, beta=0.2),
        "spatial": SpatialAttentionReLU(kernel_size=3),
    }
    with torch.no_grad():
        mods["spatial"].attention.weight.normal_(0, 0.5)
    return mods


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("cap", [0.01, 0.1, 1.0, 6.0, 100.0])
def test_scalar_cap_values(cap):
    x = torch.randn(4, 7, 5) * 3
    assert torch.equal(CappedReLU(cap)(x).double(), reference_cap(x, cap).float().double())
    assert torch.equal(capped_relu(x, cap), CappedReLU(cap)(x))


def test_inf_cap_is_relu_bit_for_bit_with_gradient():
    x = torch.randn(64, 33, requires_grad=True)
    g = torch.randn(64, 33)
    y = CappedReLU(math.inf)(x)
    assert torch.equal(y, torch.relu(x))
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(torch.relu(x), x, g)
    assert torch.equal(gx, gr)


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 7), (2, 3, 4, 4), (2, 3, 2, 2, 2)])
def test_per_channel_cap_broadcasts_over_channel_dim(shape):
    caps = torch.tensor([0.1, 0.5, 2.0])
    x = torch.randn(shape) * 3
    y = CappedReLU(caps)(x)
    assert torch.equal(y.double(), reference_cap(x, caps).float().double())
    for c in range(3):
        assert y.select(1, c).max() <= caps[c]


def test_per_channel_accepts_list_and_reports_wrong_channel_count():
    m = CappedReLU([0.1, 0.2])
    assert torch.equal(m.cap, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="2 per-channel entries but the input has shape"):
        m(torch.randn(4, 3))


def test_inplace_scalar_modifies_input_and_matches():
    x = torch.randn(10) * 2
    expected = CappedReLU(0.5)(x)
    out = CappedReLU(0.5, inplace=True)(x)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(x, expected)


def test_extra_repr_shows_cap():
    assert repr(CappedReLU(0.1)) == "CappedReLU(cap=0.1)"
    assert repr(CappedReLU(math.inf, inplace=True)) == "CappedReLU(cap=inf, inplace=True)"
    assert repr(CappedReLU([0.5, 1])) == "CappedReLU(cap=[0.5, 1])"
    assert "cap=" in repr(LearnableCappedReLU(0.2))


# ---------------------------------------------------------------- gradients and the kinks


def _kink_input(cap):
    return torch.tensor([-1.0, 0.0, cap / 2, cap, 2 * cap], dtype=torch.float64, requires_grad=True)


KINK_GRAD = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("inplace", [False, True])
def test_kink_gradient_convention_scalar(inplace):
    """Derivative is 1 on the open interval (0, cap) and 0 at both kinks (documented)."""
    x = _kink_input(0.5)
    y = CappedReLU(0.5, inplace=inplace)(x * 1)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, KINK_GRAD)


def test_kink_gradient_convention_per_channel_learnable_dynamic_functional():
    cap = 0.5
    for make in (
        lambda: CappedReLU(torch.full((5,), cap)),
        lambda: LearnableCappedReLU(cap, num_channels=5, min_cap=0.0),
        lambda: capped_relu,
    ):
        x = _kink_input(cap).view(1, 5)
        mod = make()
        y = mod(x, cap) if mod is capped_relu else mod.double()(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g.view(-1), KINK_GRAD)


def test_kink_convention_differs_from_clamp_as_documented():
    """Pins why we do not use torch.clamp: clamp's gradient at the cap differs between versions."""
    x = _kink_input(0.5)
    (g_ours,) = torch.autograd.grad(CappedReLU(0.5)(x).sum(), x)
    (g_hardtanh,) = torch.autograd.grad(F.hardtanh(x, 0.0, 0.5).sum(), x)
    assert torch.equal(g_ours, g_hardtanh)
    assert g_ours[3] == 0.0 and g_ours[1] == 0.0


def test_gradient_matches_finite_differences_away_from_kinks():
    torch.manual_seed(0)
    x = (torch.rand(20, dtype=torch.float64) * 3 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: CappedReLU(0.77)(t), (x,))
    assert torch.autograd.gradcheck(lambda t: CappedReLU(torch.tensor([0.77]))(t.view(-1, 1)), (x,))


def test_keeps_no_more_for_backward_than_relu_in_a_chain():
    """The scalar path keeps its output (shared with the next layer), like ReLU."""
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)

    def kept(act):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            act(x * 2) * w
        return sum(storages.values())

    assert kept(CappedReLU(0.5)) == kept(torch.nn.ReLU())
    assert kept(torch.nn.Hardtanh(0.0, 0.5)) > kept(torch.nn.ReLU())


def test_double_backward_through_capped_relu():
    x = torch.randn(30, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: CappedReLU(0.5)(t) * t, (x,))


# ---------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_every_activation_runs_in_every_float_dtype(device, dtype):
    torch.manual_seed(0)
    x64 = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device)
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-5)
    for name, mod in all_modules().items():
        ref_mod = copy.deepcopy(mod).to(device=device, dtype=torch.float64).eval()
        mod = mod.to(device=device, dtype=dtype).eval()
        if isinstance(mod, DynamicCappedReLU):
            mod.train()(x64.to(dtype))
            ref_mod.running_cap.copy_(mod.running_cap)
            mod.eval()
        x = x64.to(dtype).requires_grad_()
        y = mod(x)
        assert y.dtype == dtype and y.device.type == device, name
        expected = ref_mod(x.detach().double())
        assert torch.allclose(y.double(), expected, atol=tol, rtol=tol), name
        y.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name


# ---------------------------------------------------------------- learnable, dynamic, PAF, spatial


def test_learnable_cap_receives_pact_gradient_and_stays_positive():
    m = LearnableCappedReLU(0.5)
    x = torch.tensor([-1.0, 0.2, 0.5, 0.9, 3.0])
    m(x).sum().backward()
    # d/dcap sum(y) = number of units at or above the cap (3), times d softplus / d raw.
    dsoftplus = torch.sigmoid(m.raw_cap.detach())
    assert torch.allclose(m.raw_cap.grad, 3 * dsoftplus)
    opt = torch.optim.SGD(m.parameters(), lr=100.0)
    for _ in range(5):
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
    assert m.cap.item() > 0
    assert m.cap.item() == pytest.approx(m.min_cap, abs=1e-3)


def test_learnable_per_channel_caps_train_separately():
    m = LearnableCappedReLU(1.0, num_channels=2)
    x = torch.tensor([[5.0, 0.1]])
    m(x).sum().backward()
    assert m.raw_cap.grad[0] > 0 and m.raw_cap.grad[1] == 0
    assert m.cap.shape == (2,)
    assert torch.allclose(m.cap, torch.ones(2))


def test_dynamic_cap_tracks_running_quantile_and_freezes_in_eval():
    m = DynamicCappedReLU(quantile=1.0, momentum=0.5)
    x = torch.randn(100)
    assert torch.equal(m.eval()(x), torch.relu(x))  # never trained: infinite cap
    m.train()
    m(torch.tensor([1.0, 2.0, 4.0]))
    assert m.running_cap.item() == 4.0
    m(torch.tensor([0.0, 2.0]))
    assert m.running_cap.item() == 3.0  # 0.5 * 4 + 0.5 * 2
    m.eval()
    y = m(torch.tensor([10.0, 1.0]))
    assert torch.equal(y, torch.tensor([3.0, 1.0]))
    assert m.running_cap.item() == 3.0 and m.num_batches_tracked.item() == 2


def test_dynamic_cap_quantile_on_large_input_uses_strided_subsample():
    m = DynamicCappedReLU(quantile=0.5, max_samples=1000)
    x = torch.arange(100_000, dtype=torch.float32)
    m.train()(x)
    assert abs(m.running_cap.item() - 50_000) < 500


def test_dynamic_per_channel():
    m = DynamicCappedReLU(quantile=1.0, num_channels=2).train()
    m(torch.tensor([[1.0, 5.0], [3.0, 2.0]]))
    assert torch.equal(m.running_cap, torch.tensor([3.0, 5.0]))


@pytest.mark.parametrize(
    "mod, formula",
    [
        (PReLU(alpha=0.1), lambda x: torch.where(x > 0, x, 0.1 * x)),
        (PSoftplus(alpha=-2.0), lambda x: torch.log1p(torch.exp(2 * x)) / 2),
        (PSiLU(alpha=-1.5), lambda x: x * torch.sigmoid(1.5 * x)),
        (PSSiLU(alpha=1.5, beta=-0.2), lambda x: x * (torch.sigmoid(1.5 * x) - 0.2) / 0.8),
    ],
    ids=["prelu", "psoftplus", "psilu", "pssilu"],
)
def test_paf_formulas(mod, formula):
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert torch.allclose(mod.double()(x), formula(x), atol=1e-12)


def test_paf_defaults_follow_the_paper():
    assert PReLU().alpha.item() == 0.0
    assert PSoftplus().alpha.item() == 1.0
    assert PSiLU().alpha.item() == 1.0
    assert PSSiLU().alpha.item() == 1.0 and abs(PSSiLU().beta.item()) < 0.05
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(PReLU()(x), torch.relu(x))


def test_psoftplus_is_stable_for_large_inputs():
    x = torch.tensor([-1000.0, 1000.0])
    y = PSoftplus(alpha=3.0)(x)
    assert torch.isfinite(y).all() and y[1].item() == pytest.approx(1000.0)


def test_share_parameters_ties_network_wide():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), PSSiLU(), torch.nn.Linear(3, 3), PSSiLU())
    assert share_parameters(net) == 1
    assert net[1].alpha is net[3].alpha and net[1].beta is net[3].beta
    assert sum(1 for n, _ in net.named_parameters() if "alpha" in n) == 1
    net(torch.randn(2, 3)).sum().backward()
    assert net[1].alpha.grad is not None


def test_spatial_attention_relu_is_relu_at_init_then_input_dependent():
    m = SpatialAttentionReLU()
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(m(x), torch.relu(x))
    with torch.no_grad():
        m.attention.weight.normal_()
    y = m(x)
    ratio = y / torch.relu(x).clamp_min(1e-12)
    positive = torch.relu(x) > 0
    assert ratio[positive].std() > 0.05  # the gate varies over positions
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 4))


# ---------------------------------------------------------------- scripting, compile, ONNX, state


def test_torch_jit_script_matches_eager():
    x = torch.randn(2, 3, 5, 5)
    for name, mod in all_modules().items():
        mod.eval()
        with pytest.warns(FutureWarning) if hasattr(torch.jit, "script") else _nullcontext():
            scripted = torch.jit.script(mod)
        assert torch.equal(scripted(x), mod(x)), name


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_jit_trace_with_gradients(inplace):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), CappedReLU(0.3, inplace=inplace))
    x = torch.randn(3, 4)
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), model(x))
    traced(x).sum().backward()
    assert model[0].weight.grad is not None


def test_torch_compile_traces_every_activation_without_graph_breaks():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    for name, mod in all_modules().items():
        mod.eval()
        torch._dynamo.reset()
        compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
        y = compiled(x)
        assert torch.allclose(y, mod(x), atol=1e-6), name
        (g,) = torch.autograd.grad(y.sum(), x)
        (g_ref,) = torch.autograd.grad(mod(x).sum(), x)
        assert torch.allclose(g, g_ref, atol=1e-6), name


@pytest.mark.slow
def test_torch_compile_inductor_capped_relu():
    torch._dynamo.reset()
    x = torch.randn(4, 100) * 2
    assert torch.equal(torch.compile(CappedReLU(0.5))(x), CappedReLU(0.5)(x))


def test_onnx_export_as_clip(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), CappedReLU(0.25)).eval()
    x = torch.randn(3, 6)
    path = tmp_path / "capped.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False)
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert "Clip" in ops, ops
    (out,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-6)


def test_state_dict_round_trip_every_activation():
    x = torch.randn(2, 3, 5, 5)
    for name, mod in all_modules().items():
        if isinstance(mod, DynamicCappedReLU):
            mod.train()(x * 3)
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(0.123)
        buf = io.BytesIO()
        torch.save(mod.state_dict(), buf)
        buf.seek(0)
        fresh = create_activation(mod.spec) if not isinstance(mod, SpatialAttentionReLU) else SpatialAttentionReLU(3)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        mod.eval()
        fresh.eval()
        assert torch.allclose(fresh(x), mod(x), atol=1e-6), name


def test_capped_relu_has_no_state_so_relu_state_dicts_load():
    relu_net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    capped_net = torch.nn.Sequential(torch.nn.Linear(3, 3), CappedReLU(torch.ones(3)))
    capped_net.load_state_dict(relu_net.state_dict())  # strict
    assert set(capped_net.state_dict()) == set(relu_net.state_dict())


@pytest.mark.parametrize("spec_module", [m for m in all_modules().values()], ids=list(all_modules()))
def test_spec_round_trips(spec_module):
    rebuilt = create_activation(spec_module.spec)
    assert type(rebuilt) is type(spec_module)
    assert rebuilt.spec == spec_module.spec


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "cap, exc, text",
    [
        (0, ValueError, "must be > 0"),
        (-1.5, ValueError, "must be > 0"),
        (math.nan, ValueError, "NaN"),
        ("0.1", TypeError, "must be a number"),
        (True, TypeError, "must be a number"),
        (None, TypeError, "must be a number"),
        (torch.tensor([0.1, -0.2]), ValueError, "> 0 everywhere"),
        (torch.tensor([0.1, math.nan]), ValueError, "NaN"),
        (torch.ones(2, 2), ValueError, "1-D"),
        ([0.1, "a"], TypeError, "numbers only"),
    ],
)
def test_bad_caps_are_refused_with_the_fix(cap, exc, text):
    with pytest.raises(exc, match=text) as info:
        CappedReLU(cap)
    assert "math.inf" in str(info.value)


def test_bad_parameters_of_other_activations():
    with pytest.raises(ValueError, match="start finite"):
        LearnableCappedReLU(math.inf)
    with pytest.raises(ValueError, match="quantile"):
        DynamicCappedReLU(quantile=1.5)
    with pytest.raises(ValueError, match="momentum"):
        DynamicCappedReLU(momentum=0)
    with pytest.raises(ValueError, match="finite number"):
        PSSiLU(alpha=math.nan)
    with pytest.raises(TypeError, match="accepted: \\['alpha', 'beta'\\]"):
        PSSiLU(gamma=1.0)
    with pytest.raises(ValueError, match="odd"):
        SpatialAttentionReLU(kernel_size=4)


def test_every_registered_builtin_is_covered_here():
    covered = {"relu", "capped_relu", "learnable_capped_relu", "dynamic_capped_relu", "prelu",
               "psoftplus", "psilu", "pssilu", "spatial_attention_relu"}
    assert covered <= set(list_activations())
