"""The self-check every conversion runs before it returns (our own design).

The original and the converted model each run one forward and backward pass on the same input,
the converted one at ``cap=inf`` semantics (every installed activation temporarily applies the
site's own ReLU/ReLU6). Outputs must be bit-identical with the same dtypes, gradients must reach
the same parameters, and a torch function mode counts every ReLU application and who made it: an
installed activation, or code that still applies a plain ReLU. Buffers, gradients, train/eval
modes and the RNG are restored afterwards, so the check leaves no trace on either model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._records import _MARK, ConversionCheckError, _placement
from .sites import _as_args

# Every way a forward applies a ReLU: nn.ReLU runs F.relu, nn.ReLU6 runs F.hardtanh (counted
# only when the module running it is an exact nn.ReLU6), F.relu_ is torch.relu_.
_RELU_CALLS = frozenset({F.relu, torch.relu, torch.relu_, F.relu6, Tensor.relu, Tensor.relu_})
_HARDTANH = frozenset({F.hardtanh, F.hardtanh_})
_INPLACE_CALLS = frozenset({torch.relu_, Tensor.relu_})


def _calling_module(depth: int = 2) -> tuple[nn.Module | None, str, Any]:
    """The innermost module whose method is on the Python stack, the ``file:line`` of the
    frame that made the call (our own frames and torch's skipped), and that method's frame."""
    frame = sys._getframe(depth)
    where = ""
    while frame is not None:
        code = frame.f_code
        if not where and not code.co_filename.startswith(_SKIP):
            where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        owner = frame.f_locals.get("self") if "self" in code.co_varnames else None
        if isinstance(owner, nn.Module):
            return owner, where, frame
        frame = frame.f_back
    return None, where, None


_SKIP = (torch.__path__[0], __file__.rsplit("/", 1)[0])


def _is_relu_call(func: Any, module: nn.Module | None) -> bool:
    if func in _RELU_CALLS:
        return True
    return func in _HARDTANH and type(module) is nn.ReLU6


class _ReluCounter(TorchFunctionMode):
    """Records each ReLU application as ``(installed, module, where)``."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, nn.Module | None, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_CALLS or func in _HARDTANH:
            module, where, _ = _calling_module()
            if _is_relu_call(func, module):
                self.calls.append((module is not None and _MARK in module.__dict__, module, where))
        return func(*args, **(kwargs or {}))


@dataclass
class _Run:
    """One checked pass: flat outputs, the parameters gradients reached, the ReLU calls."""

    outputs: list[Any]
    spec: Any
    grads: set[str]
    calls: list[tuple[bool, nn.Module | None, str]] = field(default_factory=list)
    error: BaseException | None = None


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Buffers, ``.grad`` of parameters, module modes and the CPU RNG come back on exit."""
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]
    grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g
            for m, mode in modes:
                m.training = mode


def _fresh(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, Tensor)
                 else a for a in args)


def _run(model: nn.Module, args: tuple) -> _Run:
    """Forward with autograd in the model's own mode; the parameters the outputs' autograd
    graph reaches stand for "gets a gradient" (walking the graph costs no backward pass)."""
    counter = _ReluCounter()
    with _restored(model):
        try:
            with counter:
                out = model(*_fresh(args))
            flat, spec = tree_flatten(out)
            names = _reached(model, [t for t in flat if isinstance(t, Tensor)])
            flat = [t.detach() if isinstance(t, Tensor) else t for t in flat]
            return _Run(flat, spec, names, counter.calls)
        except Exception as exc:  # reported by the caller with what to do
            return _Run([], None, set(), counter.calls, exc)


def _reached(model: nn.Module, outputs: list[Tensor]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen, names = set(), set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in by_id:
            names.add(by_id[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@contextmanager
def _plain_caps(model: nn.Module, ops: dict[nn.Module, Callable[[Tensor], Tensor]]
                ) -> Iterator[None]:
    """Installed activations apply their site's own ReLU (``cap=inf`` semantics) inside."""
    saved = {m: m.__dict__.get("forward") for m in ops}
    try:
        for m, op in ops.items():
            m.__dict__["forward"] = op
        yield
    finally:
        for m, previous in saved.items():
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = previous


def _plain_op(upper: float, inplace: bool) -> Callable[[Tensor], Tensor]:
    if upper == 6.0:
        return lambda x: F.relu6(x, inplace)
    return lambda x: F.relu(x, inplace)


def synthesised_inputs(model: nn.Module) -> Iterator[tuple]:
    """Example forward arguments guessed from the first Linear or Conv1d/2d/3d layer in
    registration order, on the model's device and dtype: batch 1 then 2, spatial sizes from
    small to large (the first input the model runs with is used)."""
    device, dtype = _placement(model)

    def randn(*shape: int) -> Tensor:
        # a generator of its own: the same input every time, the caller's RNG untouched
        if device is not None and device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        return x.to(device=device, dtype=dtype)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            yield (randn(2, m.in_features),)
            return
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = m.weight.dim() - 2
            sizes = (32, 96, 224) if dims < 3 else (8, 16, 32)
            # batch 1 first (half the cost); batch 2 for BatchNorm in training mode
            for batch, size in [(1, sizes[0])] + [(2, size) for size in sizes]:
                yield (randn(batch, m.in_channels, *([size] * dims)),)
            return


def reference(model: nn.Module, args: tuple) -> _Run:
    """The original model's checked pass (run before converting, on a model equal to it)."""
    return _run(model, args)


def reference_run(model: nn.Module, example_input: Any) -> tuple[tuple | None, Any, str]:
    """(arguments, the unconverted model's checked pass, or None and why there is none):
    ``example_input`` must run; a synthesised input that does not run means no check."""
    if example_input is not None:
        args = _as_args(example_input)
        ref = reference(model, args)
        if ref.error is not None:
            raise ValueError(
                f"cap_relus: example_input does not run through {type(model).__name__}: "
                f"{type(ref.error).__name__}: {ref.error}. Pass the input the model takes "
                "(a tensor or a tuple of forward arguments)") from ref.error
        return args, ref, ""
    tried = []
    for args in synthesised_inputs(model):
        ref = reference(model, args)
        if ref.error is None:
            return args, ref, ""
        tried.append(f"{tuple(args[0].shape)} ({type(ref.error).__name__})")
    if not tried:
        return None, None, ("no example_input, and no Linear/Conv layer to synthesise one "
                            "from; pass example_input")
    return None, None, (f"no example_input, and the synthesised inputs {', '.join(tried)} do "
                        "not run; pass example_input")


def check(converted: nn.Module, ref: _Run, args: tuple, installed: dict[nn.Module, tuple],
          all_sites: bool, names: dict[nn.Module, str], fn: str) -> tuple[str, list[str]]:
    """Compare ``converted`` at ``cap=inf`` semantics with ``ref``; raise on any difference.

    ``installed`` maps each new activation to ``(site name, upper, inplace)``; ``all_sites``:
    every site found was converted, so no plain ReLU may remain (except inside torch.nn layers,
    which get a note). Returns a one-line summary and the notes.
    """
    ops = {m: _plain_op(upper, inplace) for m, (_, upper, inplace) in installed.items()}
    with _plain_caps(converted, ops):
        got = _run(converted, args)
    if got.error is not None:
        raise ConversionCheckError(
            f"{fn}: the converted model fails where the original runs: "
            f"{type(got.error).__name__}: {got.error}. Nothing was returned; report this with "
            "the model, or pass mode='modules' / fewer sites"
        ) from got.error
    leftover = [(m, where) for inside, m, where in got.calls if not inside]
    hidden = [(m, w) for m, w in leftover if _inside_torch_layer(m)]
    notes = []
    if hidden:
        notes.append(
            f"{fn}: {len(hidden)} ReLU application(s) inside torch.nn layers are not sites and "
            f"stay plain: {_where(hidden, names)} (docs/surgery.md, Hidden ReLUs)")
    if all_sites and len(leftover) > len(hidden):
        leftover = [c for c in leftover if c not in hidden]
        raise ConversionCheckError(
            f"{fn}: {len(leftover)} ReLU application(s) were not converted although every site "
            f"was selected: {_where(leftover, names)}. These ReLUs are invisible to the "
            "discovery used (mode='modules' lists nn.ReLU/nn.ReLU6 modules only): use "
            "mode='auto', which finds functional ReLUs and caps them by fx or at run time"
        )
    if len(got.calls) != len(ref.calls):
        raise ConversionCheckError(
            f"{fn}: the converted model applies {len(got.calls)} ReLUs at cap=inf, the original "
            f"{len(ref.calls)}; not converted: {_where(leftover, names) or 'none'}. Report this "
            "with the model; convert fewer sites meanwhile"
        )
    _compare_outputs(ref, got, fn)
    if ref.grads != got.grads:
        gained = sorted(got.grads - ref.grads)
        lost = sorted(ref.grads - got.grads)
        raise ConversionCheckError(
            f"{fn}: at cap=inf the converted model's gradients reach other parameters than the "
            f"original's (now reached: {gained[:5]}; no longer reached: {lost[:5]}): a "
            "regenerated forward lost a `with torch.no_grad()`/`enable_grad` block or a "
            "detach. Pass those owners' sites by their own path or report this with the model"
        )
    values = "bit-identical outputs" if all(
        not isinstance(t, Tensor) or t.device.type != "meta" for t in ref.outputs) else (
        "meta tensors: shapes and dtypes")
    inside = sum(1 for c in got.calls if c[0])
    return (f"passed at cap=inf: {values}, same dtypes, gradients reach the same "
            f"{len(ref.grads)} parameters, {len(got.calls)} ReLU applications, "
            f"{inside} through new activations"), notes


def _inside_torch_layer(m: nn.Module | None) -> bool:
    """A layer of torch.nn applying a ReLU inside itself (TransformerEncoderLayer)."""
    return m is not None and type(m).__module__.startswith("torch.nn.") and (
        type(m) not in (nn.ReLU, nn.ReLU6))


def _where(calls: list[tuple[nn.Module | None, str]], names: dict[nn.Module, str]) -> str:
    parts = list(dict.fromkeys(
        (f"in {_label(names.get(m, '?'))} ({type(m).__name__})" if m is not None else "")
        + (f" at {where}" if where else "") for m, where in calls))
    return "; ".join(parts[:5]) + (f"; ... ({len(parts) - 5} more)" if len(parts) > 5 else "")


def _label(path: str) -> str:
    return repr(path) if path else "the model itself"


def _compare_outputs(ref: _Run, got: _Run, fn: str) -> None:
    if ref.spec != got.spec or len(ref.outputs) != len(got.outputs):
        raise ConversionCheckError(
            f"{fn}: at cap=inf the converted model returns another structure than the "
            f"original ({got.spec} instead of {ref.spec}); report this with the model")
    for k, (a, b) in enumerate(zip(ref.outputs, got.outputs)):
        if not isinstance(a, Tensor):
            continue
        if a.dtype != b.dtype:
            raise ConversionCheckError(
                f"{fn}: at cap=inf output {k} of the converted model is {b.dtype}, the "
                f"original's is {a.dtype}: a regenerated forward lost a `with torch.autocast` "
                "block (or another dtype context). Report this with the model")
        if a.shape != b.shape or (a.device.type != "meta" and not torch.equal(a, b)):
            raise ConversionCheckError(
                f"{fn}: at cap=inf output {k} of the converted model differs from the "
                "original's (a regenerated forward changed what the model computes); report "
                "this with the model, and convert the sites of other owners meanwhile")
