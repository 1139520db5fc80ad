"""Capped ReLU and the robust activations it is compared against.

Every activation is a plain ``nn.Module`` with its formula in ``forward`` and its parameters in
``extra_repr``; ``spec`` gives a string that :func:`relucap_plugin.create_activation` turns back
into an equal module.

Gradient convention (pinned by ``tests/test_activations.py``): the capped ReLU has derivative 1
on the open interval ``0 < z < cap`` and 0 everywhere else, *including both kinks* ``z == 0``
and ``z == cap``. At 0 this is what ``torch.relu`` does; at the cap it is what
``torch.nn.functional.hardtanh`` does (``torch.clamp`` would give 1 there).
"""

import math
from typing import Any
import numbers
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._format import short_repr

__all__ = [
    "CappedReLU",
    "LearnableCappedReLU",
    "DynamicCappedReLU",
    "PReLU",
    "PSoftplus",
    "PSiLU",
    "PSSiLU",
    "SpatialAttentionReLU",
    "capped_relu",
    "share_parameters",
    "validate_cap",
]

_CAP_HELP = (
    "use a positive float, math.inf (plain ReLU), or a 1-D tensor/list of positive "
    "per-channel caps"
)


def validate_cap(cap: object, name: str = "cap") -> float | Tensor:
    """Return ``cap`` as a positive float (``inf`` allowed) or a 1-D float tensor.

    Raises ``TypeError`` for a non-number and ``ValueError`` for a cap that is not > 0 or NaN,
    with a message that says what is accepted.
    """
    if isinstance(cap, (list, tuple)):
        if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in cap):
            raise TypeError(f"{name} list must hold numbers only (got {cap!r}); {_CAP_HELP}")
        cap = torch.tensor([float(c) for c in cap], dtype=torch.float32)
    if isinstance(cap, Tensor):
        if cap.dim() == 0:
            cap = cap.item()
        else:
            if cap.dim() != 1 or cap.numel() == 0:
                raise ValueError(
                    f"{name} tensor must be 1-D and non-empty, one cap per channel "
                    f"(got shape {tuple(cap.shape)}); {_CAP_HELP}"
                )
            if not cap.is_floating_point():
                cap = cap.float()
            if torch.isnan(cap).any():
                raise ValueError(f"{name} holds NaN; {_CAP_HELP}")
            if (cap <= 0).any():
                raise ValueError(
                    f"{name} must be > 0 everywhere (smallest is {cap.min().item():g}); "
                    f"{_CAP_HELP}"
                )
            return cap.detach().clone()
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(cap).__name__} {cap!r}; {_CAP_HELP}")
    cap = float(cap)
    if math.isnan(cap):
        raise ValueError(f"{name} is NaN; {_CAP_HELP}")
    if cap <= 0:
        raise ValueError(f"{name} must be > 0 (got {cap:g}); {_CAP_HELP}")
    return cap


@torch.jit.unused
def _wrong_channel_count(cap: Tensor, x: Tensor) -> None:
    """The eager error of :func:`channel_view`, with the caps' values (TorchScript has its own)."""
    raise ValueError(
        f"cap={short_repr(cap.tolist())} has {cap.shape[0]} per-channel entries but the input "
        f"has shape {list(x.shape)}; channels are dim 1 of an (N, C, *) input: give cap= one "
        "entry per channel, or a number"
    )


def channel_view(cap: Tensor, x: Tensor) -> Tensor:
    """Reshape per-channel ``cap`` of shape (C,) to broadcast over ``x`` of shape (N, C, *)."""
    if x.dim() < 2 or x.shape[1] != cap.shape[0]:
        if not torch.jit.is_scripting():
            _wrong_channel_count(cap, x)
        raise ValueError(
            "cap= has " + str(cap.shape[0]) + " per-channel entries but the input has shape "
            + str(list(x.shape)) + "; channels are dim 1 of an (N, C, *) input: give cap= one "
            "entry per channel, or a number"
        )
    shape = [1] * x.dim()
    shape[1] = cap.shape[0]
    return cap.to(dtype=x.dtype, device=x.device).view(shape)


def _cap_where(x: Tensor, cap: Tensor) -> Tensor:
    """min(max(x, 0), cap) for a broadcastable tensor ``cap``, with the kink convention above.

    Gradient w.r.t. ``x``: 1 where 0 < x < cap, else 0. Gradient w.r.t. ``cap``: 1 where
    x >= cap (PACT). NaN in ``x`` propagates.
    """
    return torch.where(x >= cap, cap, F.relu(x))


class _KeepOutputHardtanh(torch.autograd.Function):
    """``hardtanh(x, 0, cap)`` that keeps its *output* for backward, as ReLU does.

    ``F.hardtanh`` keeps its input; in a Linear -> act -> Linear chain the next layer keeps the
    output anyway, so keeping the output shares that tensor and the cap costs no memory beyond
    ReLU's (see ``benchmarks/bench_activations.py``). The backward is ATen's single
    ``hardtanh_backward`` kernel fed with the output: ``0 < y < cap`` iff ``0 < x < cap``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cap: float, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            y = F.hardtanh_(x, 0.0, cap)
        else:
            y = F.hardtanh(x, 0.0, cap)
        ctx.save_for_backward(y)
        ctx.cap = cap
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, ctx.cap), None, None


def _hardtanh_cap(x: Tensor, cap: float, inplace: bool) -> Tensor:
    if torch.jit.is_scripting():
        return F.hardtanh(x, 0.0, cap, inplace)
    if cap >= torch.finfo(x.dtype).max:  # cannot bind in x's dtype; hardtanh would overflow
        return F.relu(x, inplace=inplace)
    if (
        not (torch.is_grad_enabled() and x.requires_grad)
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    ):
        return F.hardtanh(x, 0.0, cap, inplace)
    return _KeepOutputHardtanh.apply(x, cap, inplace)


def capped_relu(x: Tensor, cap: float | Tensor, inplace: bool = False) -> Tensor:
    """Functional capped ReLU ``min(max(x, 0), cap)``; ``cap`` as in :class:`CappedReLU`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"capped_relu: x must be a torch.Tensor, got {type(x).__name__} {short_repr(x)}; "
                        "pass torch.as_tensor(x)")
    if isinstance(cap, Tensor) and cap.dim() > 0:
        return _cap_where(x, channel_view(cap, x))
    cap = float(cap)
    if math.isinf(cap):
        return F.relu(x, inplace=inplace)
    return _hardtanh_cap(x, cap, inplace)


def _format_cap(cap: float | Tensor) -> str:
    if isinstance(cap, Tensor):
        return "[" + ", ".join(f"{v:g}" for v in cap.tolist()) + "]"
    return "inf" if math.isinf(cap) else f"{cap:g}"


class CappedReLU(nn.Module):
    """Capped ReLU a(z) = min(max(z, 0), cap) of Sooksatra et al. (arXiv 2405.03777).

    ``cap`` is a positive float, ``math.inf`` (then the module is ``torch.relu`` bit for bit),
    or a 1-D tensor of per-channel caps broadcast over an (N, C, *) input. A scalar cap computes
    ``hardtanh(x, 0, cap)`` and keeps its output for backward exactly like ReLU (no extra
    memory in a network); it scripts, compiles, and exports to ONNX as ``Clip``. Per-channel
    caps are always computed out of place.

    The cap is configuration, not learned state: it is a non-persistent buffer, so a model's
    ``state_dict`` keys are the same with and without caps.
    """

    __jit_unused_properties__ = ["cap", "spec"]
    per_channel: bool
    cap_value: float
    inplace: bool

    def __init__(self, cap: float | Tensor | Sequence[float] = 6.0, inplace: bool = False):
        super().__init__()
        cap = validate_cap(cap)
        self.inplace = bool(inplace)
        self.per_channel = isinstance(cap, Tensor)
        self.cap_value = math.nan if self.per_channel else float(cap)
        self.register_buffer(
            "cap_tensor", cap if self.per_channel else torch.empty(0), persistent=False
        )

    @property
    def cap(self) -> float | Tensor:
        """The cap: a float, or the (C,) tensor of per-channel caps."""
        return self.cap_tensor if self.per_channel else self.cap_value

    def forward(self, x: Tensor) -> Tensor:
        if self.per_channel:
            return _cap_where(x, channel_view(self.cap_tensor, x))
        if math.isinf(self.cap_value):
            return F.relu(x, inplace=self.inplace)
        return _hardtanh_cap(x, self.cap_value, self.inplace)

    @property
    def spec(self) -> str:
        return f"capped_relu(cap={_format_cap(self.cap)})"

    def extra_repr(self) -> str:
        text = f"cap={_format_cap(self.cap)}"
        return text + (", inplace=True" if self.inplace else "")


def _inverse_softplus(value: Tensor) -> Tensor:
    # softplus(r) = log(1 + e^r)  =>  r = log(e^v - 1) = v + log(1 - e^-v), stable for large v.
    return value + torch.log(-torch.expm1(-value))


class LearnableCappedReLU(nn.Module):
    """Capped ReLU whose cap is trained with the network (PACT-style, Choi et al. 2018).

    The cap is ``softplus(raw_cap) + min_cap`` so it stays positive; the gradient reaching it is
    the sum of the upstream gradient over units at or above the cap. ``num_channels=None`` gives
    one scalar cap; an int gives one cap per channel of an (N, C, *) input.
    """

    __jit_unused_properties__ = ["cap", "spec"]
    min_cap: float

    def __init__(self, cap: float = 6.0, num_channels: int | None = None, min_cap: float = 1e-3):
        super().__init__()
        cap = validate_cap(cap)
        if isinstance(cap, Tensor):
            if num_channels is not None and num_channels != cap.numel():
                raise ValueError(
                    f"cap has {cap.numel()} entries but num_channels={num_channels}; "
                    "pass one of them or make them agree"
                )
            init = cap
        else:
            if math.isinf(cap):
                raise ValueError(f"a learnable cap must start finite (got cap={cap!r}); use e.g. cap=6.0")
            if num_channels is not None and (
                isinstance(num_channels, bool) or not isinstance(num_channels, int)
                or num_channels < 1
            ):
                raise ValueError(f"num_channels must be a positive int or None (got {num_channels!r})")
            shape = () if num_channels is None else (num_channels,)
            init = torch.full(shape, cap)
        min_cap = float(min_cap)
        if not min_cap >= 0 or bool((init <= min_cap).any()):
            raise ValueError(
                f"min_cap must be >= 0 and below the initial cap (min_cap={min_cap:g}, "
                f"cap={_format_cap(cap)})"
            )
        self.min_cap = min_cap
        self.raw_cap = nn.Parameter(_inverse_softplus(init.float() - min_cap))

    @property
    def cap(self) -> Tensor:
        """The current (positive) cap, shape () or (C,)."""
        return F.softplus(self.raw_cap) + self.min_cap

    def forward(self, x: Tensor) -> Tensor:
        cap = (F.softplus(self.raw_cap) + self.min_cap).to(x.dtype)
        if cap.dim() > 0:
            cap = channel_view(cap, x)
        return _cap_where(x, cap)

    @property
    def spec(self) -> str:
        cap = self.cap.detach().cpu()
        if cap.dim() == 0:
            return f"learnable_capped_relu(cap={cap.item():g}, min_cap={self.min_cap:g})"
        return f"learnable_capped_relu(cap={_format_cap(cap)}, min_cap={self.min_cap:g})"

    def extra_repr(self) -> str:
        cap = self.cap.detach()
        if cap.dim() == 0:
            return f"cap={cap.item():.4g}"
        return f"num_channels={cap.numel()}, cap in [{cap.min().item():.4g}, {cap.max().item():.4g}]"


class DynamicCappedReLU(nn.Module):
    """Capped ReLU whose cap follows the activations' running ``quantile``.

    In the direction of "Dynamic-Max-Value ReLU" (Sooksatra & Rivas, Mathematics 2024); that
    paper's exact rule is not available to us, so **this rule is our own design**: in training
    mode each call measures the ``quantile`` of its input (on at most ``max_samples`` evenly
    strided entries), updates ``running_cap`` with ``momentum`` like BatchNorm's running
    statistics (the first call sets it outright), and caps at ``scale * running_cap``. In eval
    mode the cap is frozen. Before any training call the cap is infinite (plain ReLU).
    ``num_channels`` gives one running cap per channel of an (N, C, *) input.
    """

    __jit_unused_properties__ = ["spec"]
    quantile: float
    momentum: float
    scale: float
    max_samples: int

    def __init__(
        self,
        quantile: float = 0.999,
        momentum: float = 0.1,
        scale: float = 1.0,
        num_channels: int | None = None,
        max_samples: int = 65536,
    ):
        super().__init__()
        if not 0.0 < float(quantile) <= 1.0:
            raise ValueError(f"quantile must be in (0, 1] (got {quantile!r})")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] (got {momentum!r})")
        if not (float(scale) > 0 and math.isfinite(float(scale))):
            raise ValueError(f"scale must be a positive finite number (got {scale!r})")
        if int(max_samples) < 1:
            raise ValueError(f"max_samples must be >= 1 (got {max_samples!r})")
        self.quantile = float(quantile)
        self.momentum = float(momentum)
        self.scale = float(scale)
        self.max_samples = int(max_samples)
        shape = () if num_channels is None else (int(num_channels),)
        self.register_buffer("running_cap", torch.full(shape, math.inf))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _measure(self, x: Tensor) -> Tensor:
        if self.running_cap.dim() == 0:
            flat = x.detach().reshape(1, -1)
        else:
            flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
        step = max(1, -(-flat.shape[1] // self.max_samples))
        flat = flat[:, ::step].float()
        k = max(1, min(flat.shape[1], int(math.ceil(self.quantile * flat.shape[1]))))
        stat = flat.kthvalue(k, dim=1).values.clamp_min(1e-6)
        return stat.reshape(self.running_cap.shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.running_cap.dim() > 0 and (x.dim() < 2 or x.shape[1] != self.running_cap.shape[0]):
            channel_view(self.running_cap, x)  # raises the shape error
        if self.training:
            with torch.no_grad():
                stat = self._measure(x).to(self.running_cap.device)
                if int(self.num_batches_tracked) == 0:
                    self.running_cap.copy_(stat)
                else:
                    self.running_cap.mul_(1 - self.momentum).add_(stat, alpha=self.momentum)
                self.num_batches_tracked += 1
        cap = (self.running_cap * self.scale).to(x.dtype)
        if cap.dim() > 0:
            cap = channel_view(cap, x)
        return _cap_where(x, cap)

    @property
    def spec(self) -> str:
        text = f"dynamic_capped_relu(quantile={self.quantile:g}, momentum={self.momentum:g}"
        if self.scale != 1.0:
            text += f", scale={self.scale:g}"
        if self.running_cap.dim() > 0:
            text += f", num_channels={self.running_cap.shape[0]}"
        return text + ")"

    def extra_repr(self) -> str:
        cap = self.running_cap
        value = f"{cap.item():.4g}" if cap.dim() == 0 else f"per-channel({cap.shape[0]})"
        return (
            f"quantile={self.quantile:g}, momentum={self.momentum:g}, scale={self.scale:g}, "
            f"running_cap={value}"
        )


class _ParametricActivation(nn.Module):
    """Base of the activations of Dai et al. (arXiv 2110.05626): named scalar parameters.

    Each instance owns its parameters (per-module); :func:`share_parameters` ties them across
    modules for the paper's network-wide setting.
    """

    __jit_unused_properties__ = ["spec"]
    name: str = ""
    defaults: dict[str, float] = {}

    def __init__(self, **values: float):
        super().__init__()
        for key, default in self.defaults.items():
            value = values.pop(key, default)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{self.name}: {key} must be a finite number (got {value!r})")
            self.register_parameter(key, nn.Parameter(torch.tensor(float(value))))
        if values:
            raise TypeError(
                f"{self.name}: unknown parameter(s) {sorted(values)}; accepted: {sorted(self.defaults)}"
            )

    @property
    def spec(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k).item():g}" for k in self.defaults)
        return f"{self.name}({args})"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k).item():.4g}" for k in self.defaults)


class PReLU(_ParametricActivation):
    """x for x > 0, alpha * x otherwise; alpha starts at 0 (Dai et al. 2110.05626)."""

    name = "prelu"
    defaults = {"alpha": 0.0}

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, self.alpha.to(x.dtype) * x)


class PSoftplus(_ParametricActivation):
    """(1/|alpha|) log(1 + exp(|alpha| x)), via log-sigmoid for stability; alpha starts at 1."""

    name = "psoftplus"
    defaults = {"alpha": 1.0}

    def forward(self, x: Tensor) -> Tensor:
        a = self.alpha.to(x.dtype).abs().clamp_min(1e-6)
        return -F.logsigmoid(-a * x) / a


class PSiLU(_ParametricActivation):
    """x * sigmoid(|alpha| x); alpha starts at 1 (Dai et al. 2110.05626)."""

    name = "psilu"
    defaults = {"alpha": 1.0}

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.alpha.to(x.dtype).abs() * x)


class PSSiLU(_ParametricActivation):
    """x * (sigmoid(|alpha| x) - |beta|) / (1 - |beta|) (Dai et al. 2110.05626).

    alpha starts at 1 and beta at 0.01 (not exactly 0: the gradient of |beta| at 0 is 0, so a
    zero start would never move). |beta| is clamped to at most 0.99 to keep the denominator
    away from 0.
    """

    name = "pssilu"
    defaults = {"alpha": 1.0, "beta": 0.01}

    def forward(self, x: Tensor) -> Tensor:
        a = self.alpha.to(x.dtype).abs()
        b = self.beta.to(x.dtype).abs().clamp_max(0.99)
        return x * (torch.sigmoid(a * x) - b) / (1 - b)


def share_parameters(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Tie the parameters of every parametric activation of one class to the first one found.

    ``modules`` is a model (its submodules are searched) or an iterable of activations. This is
    the network-wide setting of Dai et al.: one alpha (and beta) for the whole network. Returns
    how many modules now share another module's parameters.
    """
    if not isinstance(modules, nn.Module) and not isinstance(modules, Iterable):
        raise TypeError(f"share_parameters: modules must be a model or an iterable of activation modules, "
                        f"got {type(modules).__name__} {short_repr(modules)}")
    found = modules.modules() if isinstance(modules, nn.Module) else modules
    first: dict[type, nn.Module] = {}
    tied = 0
    for module in found:
        if not isinstance(module, _ParametricActivation):
            continue
        owner = first.setdefault(type(module), module)
        if owner is module:
            continue
        for key in module.defaults:
            setattr(module, key, getattr(owner, key))
        tied += 1
    return tied


class SpatialAttentionReLU(nn.Module):
    """ReLU gated by a learned per-position attention map, in the direction of Sparta.

    Guo et al. (arXiv 2105.08269) make ReLU input-dependent and spatially varying; their exact
    equation is not available to us, so **this gate is our own design**: for an (N, C, H, W)
    input, r = relu(x); the channel mean and max of r (2 maps) go through a ``kernel_size``
    convolution to one map g, and the output is ``r * 2 * sigmoid(g)``. The convolution starts
    at zero, so an untrained module is exactly ReLU and training moves it away from it.
    """

    __jit_unused_properties__ = ["spec"]

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (got {kernel_size!r})")
        self.attention = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.attention.weight)
        nn.init.zeros_(self.attention.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                "SpatialAttentionReLU needs a 4-D (N, C, H, W) feature map, got shape "
                + str(list(x.shape)) + "; use it on convolutional layers only"
            )
        r = F.relu(x)
        stats = torch.cat([r.mean(dim=1, keepdim=True), r.amax(dim=1, keepdim=True)], dim=1)
        gate = 2.0 * torch.sigmoid(self.attention(stats.to(self.attention.weight.dtype)))
        return r * gate.to(r.dtype)

    @property
    def spec(self) -> str:
        return f"spatial_attention_relu(kernel_size={self.attention.kernel_size[0]})"

    def extra_repr(self) -> str:
        return f"kernel_size={self.attention.kernel_size[0]}"


# --------------------------------------------------------------------------------------------
# Caps in checkpoints: CappedReLU's cap is a non-persistent buffer (not in the state dict), so a
# checkpoint records the caps next to the weights. Our own design.


def saved_caps(model: nn.Module) -> dict[str, float | list[float]]:
    """``{module path: cap}`` of every finite :class:`CappedReLU` in ``model`` and of every cap a
    module carries outside its state dict: a forward hook object with a numeric ``cap`` (what
    ``cap_relus(..., quantizable=True)`` installs on ``nn.ReLU`` modules) or a module's own
    numeric ``cap`` attribute (its ``CappedFunctional``). What ``save_checkpoint`` stores next to
    the weights, so a model loaded without them is refused instead of evaluated uncapped."""
    out: dict[str, float | list[float]] = {}
    for name, m in model.named_modules():
        if isinstance(m, CappedReLU):
            if m.per_channel or math.isfinite(m.cap_value):
                out[name] = m.cap_tensor.tolist() if m.per_channel else m.cap_value
            continue
        caps = [getattr(h, "cap", None) for h in m._forward_hooks.values()]
        caps.append(vars(m).get("cap"))
        caps = [float(c) for c in caps if isinstance(c, (int, float)) and not isinstance(c, bool)
                and math.isfinite(c)]
        if caps:
            out[name] = min(caps)
    return out


def apply_saved_caps(model: nn.Module, caps: dict[str, Any], *, restore: bool, where: str) -> None:
    """Check that ``model`` has the ``caps`` a checkpoint was saved with (extra caps in ``model``
    are its own choice). With ``restore``, a plain ``nn.ReLU`` (or another cap) at a saved site is
    replaced by the saved ``CappedReLU``; any other difference is a ``ValueError`` naming the
    sites, raised before ``model`` is changed. Never silently another model."""
    modules = dict(model.named_modules())
    wrong = {p: c for p, c in caps.items() if saved_caps(model).get(p) != c}
    if not wrong:
        return
    fixable = {p for p in wrong if p and type(modules.get(p)) in (nn.ReLU, CappedReLU)}
    if not restore or set(wrong) - fixable:
        shown = ", ".join(f"{p or '(root)'}: cap {_format_cap(torch.tensor(c) if isinstance(c, list) else c)} "
                          f"(model: {type(modules[p]).__name__ if p in modules else 'no module'})"
                          for p, c in list(wrong.items())[:5])
        fix = ("pass restore_caps=True to put them back" if not set(wrong) - fixable else
               "build the model with them, e.g. cap_relus(model, {site: cap}) before loading")
        raise ValueError(f"{where} was saved from a model with caps this model lacks ({shown}); "
                         f"evaluating it would measure another model: {fix}")
    for p in wrong:
        parent, _, name = p.rpartition(".")
        setattr(modules[parent] if parent else model, name, CappedReLU(caps[p]))
