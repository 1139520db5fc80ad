"""The self-check every conversion runs before it returns (our own design).

The original and the converted model each run one forward pass on the same input, the
converted one at ``cap=inf`` semantics (every installed activation temporarily applies the
site's own ReLU/ReLU6). Outputs must be bit-identical with the same dtypes, and a torch function
mode counts every ReLU application and who made it: an installed activation, or code that still
applies a plain ReLU. Where a forward was regenerated or wrapped, both passes run with autograd
and gradients must reach the same parameters; where every site is a module swap (the user's
forwards run unchanged) both run under ``no_grad``. Buffers, gradients, train/eval modes and
the RNG are restored afterwards, so the check leaves no trace on either model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._format import short_repr
from .._torch import all_modules, float_dtype, model_device
from ._records import ConversionCheckError
from .recorder import RELU_LIKE_FORMS, ReluRecorder, _Application
from .running import _first_paths, _is_site_call

def _as_args(example_input: Any, model: nn.Module | None = None, fn: str = "cap_relus") -> tuple:
    """Forward arguments from ``example_input`` (a tensor, a tuple/list of positional
    arguments, or a dict of keyword arguments of ``model``'s forward); tensors cloned (a model
    may work in place)."""
    if isinstance(example_input, Mapping) and model is not None:
        example_input = _positional(model, example_input, fn)
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    return tuple(a.clone() if isinstance(a, Tensor) else a for a in args)


def _positional(model: nn.Module, kwargs: Mapping[str, Any], fn: str) -> tuple:
    """Keyword arguments of ``model``'s forward as the positional arguments they bind to (the
    parameters before the last one given take their defaults): every pass of the check and the
    fx shape pass take positional arguments."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    unknown = [k for k in kwargs if k not in names]
    if unknown or not kwargs:
        raise ValueError(
            f"{fn}: example_input is a dict whose keys {unknown or '(none)'} are not positional "
            f"parameters of {type(model).__name__}.forward {tuple(names)}; pass a dict of its "
            "parameters, or a tuple of its positional arguments")
    last = max(names.index(k) for k in kwargs)
    missing = [p.name for p in params[:last] if p.name not in kwargs and p.default is p.empty]
    if missing:
        raise ValueError(
            f"{fn}: example_input gives {sorted(kwargs)} but not {missing}, which "
            f"{type(model).__name__}.forward needs before them; add them to the dict")
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params[:last + 1])



@dataclass
class _Run:
    """One checked pass: flat outputs, the parameters gradients reached (None: the pass ran
    without autograd), the ReLU calls."""

    outputs: list[Any]
    spec: Any
    grads: set[str] | None
    calls: list[_Application] = field(default_factory=list)
    error: BaseException | None = None
    reads: list[tuple[str, nn.Module | None]] = field(default_factory=list)
    relu_like: list[tuple[nn.Module | None, str]] = field(default_factory=list)


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Buffers, ``.grad`` of parameters, module modes and the CPU RNG come back on exit."""
    modules = all_modules(model)  # one walk of the tree serves all three
    buffers = list(dict.fromkeys(b for m in modules for b in m._buffers.values() if b is not None))
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    grads = [(p, p.grad) for m in modules for p in m._parameters.values() if p is not None]
    modes = [(m, m.training) for m in modules]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            yield
        finally:
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(buffers, saved)
            for p, g in grads:
                if p.grad is not g:
                    p.grad = g
            for m, mode in modes:
                if m.training is not mode:  # nn.Module.__setattr__ is slow; most stay as they were
                    m.training = mode


def _fresh(args: tuple, grads: bool) -> tuple:
    return tuple((a.detach().clone().requires_grad_(grads and a.is_floating_point()))
                 if isinstance(a, Tensor) else a for a in args)


def _run(model: nn.Module, args: tuple, grads: bool) -> _Run:
    """Forward in the model's own mode, with autograd if ``grads`` (the parameters the
    outputs' autograd graph reaches stand for "gets a gradient"; walking the graph costs no
    backward pass), else under ``no_grad``."""
    counter = ReluRecorder()
    with _restored(model):
        try:
            with counter, (nullcontext() if grads else torch.no_grad()):
                out = model(*_fresh(args, grads))
            flat, spec = tree_flatten(out)
            names = _reached(model, [t for t in flat if isinstance(t, Tensor)]) if grads else None
            flat = [t.detach() if isinstance(t, Tensor) else t for t in flat]
            return _Run(flat, spec, names, counter.calls, reads=counter.reads,
                        relu_like=counter.relu_like)
        except Exception as exc:  # reported by the caller with what to do
            return _Run([], None, None, counter.calls, exc, counter.reads, counter.relu_like)


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


class _CapsDoNotFit(ValueError):
    """A per-channel cap whose length is not the site's channel count."""


def _plain_op(upper: float, inplace: bool, module: nn.Module, site: str
              ) -> Callable[[Tensor], Tensor]:
    """The site's own ReLU/ReLU6, after checking that per-channel caps fit the input."""
    relu = (lambda x: F.relu6(x, inplace)) if upper == 6.0 else (lambda x: F.relu(x, inplace))
    caps = getattr(module, "cap_tensor", None) if getattr(module, "per_channel", False) else None
    if not isinstance(caps, Tensor):
        return relu

    def checked(x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != caps.numel():
            raise _CapsDoNotFit(
                f"cap={short_repr(caps.tolist())} gives site {site!r} a per-channel cap of "
                f"{caps.numel()} entries but its input has shape {tuple(x.shape)}; pass cap= "
                f"one cap per channel ({x.shape[1] if x.dim() >= 2 else 'an (N, C, *) input'}), "
                "a number, or a mapping {site name: cap}")
        return relu(x)

    return checked


def synthesised_inputs(model: nn.Module) -> Iterator[tuple]:
    """Example forward arguments guessed from the first Embedding (8 token ids), Linear or
    Conv1d/2d/3d layer in registration order, on the model's device and dtype, spatial sizes
    from small to large, then 28 (MNIST); the first input the model runs with is used (batch 1, see
    :func:`_first_that_runs`). A 2-D conv model with fewer than :data:`SMALL_MODEL` parameters
    is tried at 64 before 32 (our own rule): its forward costs about as much at 64 as at 32 (the
    time goes to Python, not arithmetic), and a size that fails costs a forward pass up to the
    failure (ghostnetv3_050 fails at 32 in its last stage)."""
    device, dtype = model_device(model), float_dtype(model, torch.get_default_dtype())

    def randn(*shape: int) -> Tensor:
        # a generator of its own: the same input every time, the caller's RNG untouched
        if device is not None and device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        return x.to(device=device, dtype=dtype)

    modules = all_modules(model)
    for m in modules:
        if isinstance(m, nn.Embedding):  # token ids: a short sequence of valid indices
            g = torch.Generator().manual_seed(0)
            yield (torch.randint(0, m.num_embeddings, (1, 8), generator=g).to(device),)
            return
        if isinstance(m, nn.Linear):
            yield (randn(1, m.in_features),)
            return
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = m.weight.dim() - 2
            sizes = (32, 64, 96, 224, 28) if dims < 3 else (8, 16, 32)
            if dims == 2 and _parameter_count(modules) < SMALL_MODEL:
                sizes = (64, 32, 96, 224, 28)
            for size in sizes:
                yield (randn(1, m.in_channels, *([size] * dims)),)
            return


SMALL_MODEL = 10_000_000
"""Below this many parameters a 2-D conv model's synthesised input is tried at 64x64 first.
Measured over the 63 timm models of the zoo test (one thread, ``no_grad``, batch 1): under 10 M
parameters a forward at 64x64 took at most 14 ms more than at 32x32 (densenet121: 32 -> 46),
above it up to 93 (nasnetalarge: 190 -> 283)."""


def _parameter_count(modules: list[nn.Module]) -> int:
    """Parameters of ``modules``, each counted once (a lazy module's not yet made: none)."""
    return sum(p.numel() for p in dict.fromkeys(
        p for m in modules for p in m._parameters.values()
        if p is not None and not isinstance(p, nn.parameter.UninitializedTensorMixin)))


def _batch_of_two(args: tuple) -> tuple:
    return (torch.cat([args[0], args[0]]),)


def _first_that_runs(model: nn.Module, run: Callable[[nn.Module, tuple], _Run]
                     ) -> tuple[tuple | None, _Run | None, str]:
    """``run`` on the first synthesised input the model takes: (args, result, "") or
    (None, None, why). A batch of 2 is tried only where batch 1 fails for BatchNorm in
    training mode (every size of a synthesised input costs a forward pass, failed ones too)."""
    tried, skipped = [], []
    at_least = 0
    for args in synthesised_inputs(model):
        if args[0].dim() > 2 and args[0].shape[-1] < at_least:
            skipped.append(args[0].shape[-1])
            continue
        got = run(model, args)
        if got.error is not None and _needs_two_rows(got.error):
            args = _batch_of_two(args)
            got = run(model, args)
        if got.error is None:
            return args, got, ""
        tried.append(f"{tuple(args[0].shape)} ({type(got.error).__name__})")
        if args[0].dim() > 2:
            at_least = max(at_least, _size_needed(got.error, args[0].shape[-1]))
    if not tried:
        return None, None, ("no example_input, and no Linear/Conv layer to synthesise one "
                            "from; pass example_input")
    why = (f" (sizes {', '.join(map(str, skipped))} skipped: a conv/pooling layer needs an "
           f"input of about {at_least})") if skipped else ""
    return None, None, (f"no example_input, and the synthesised inputs {', '.join(tried)} do "
                        f"not run{why}; pass example_input")


def _size_needed(error: BaseException, size: int) -> int:
    """The input size a synthesised try at ``size`` failed for, scaled to what the failing
    layer needs: the innermost module on the traceback (a torch conv or pooling layer)
    received an input of spatial size ``h`` smaller than its padded-in kernel ``k``, so the
    model shrinks its input ``size / h`` times up to there and needs about ``size * k / h``.
    0 when the innermost module on the traceback is not such a layer. Smaller sizes are
    skipped: each failed try costs a forward pass up to where it fails (inception_resnet_v2
    fails at 32 and at 64). Our own heuristic; a wrong guess only skips sizes that would
    fail in that layer too."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        layer = frame.f_locals.get("self")
        if not isinstance(layer, nn.Module):
            continue
        if not isinstance(layer, _KERNELS):
            return 0  # a module of its own failed: its code, not a layer's kernel, says why
        code = frame.f_code
        x = next((v for v in (frame.f_locals.get(n) for n in
                              code.co_varnames[1:code.co_argcount]) if isinstance(v, Tensor)),
                 None)
        if x is None or x.dim() < 3:
            return 0
        spatial = min(x.shape[2:])
        pad, dilation = getattr(layer, "padding", 0), getattr(layer, "dilation", 1)
        reach = max(_ints(dilation)) * (max(_ints(layer.kernel_size)) - 1) + 1
        need = reach - (2 * min(_ints(pad)) if not isinstance(pad, str) else 0)
        return -(-size * need // spatial) if 0 < spatial < need else 0
    return 0


_KERNELS = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, (tuple, list)):
        parts = ", ".join(_describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"a {type(value).__name__} of {len(value)} forward argument(s) ({parts})"
    return f"a {type(value).__name__}"


def _expected_input(model: nn.Module) -> str:
    """What the model's first Embedding/Linear/Conv layer takes, as an example call."""
    device, dtype = model_device(model), float_dtype(model, torch.get_default_dtype())
    where = f", {dtype} on {device}"
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return (f"torch.randint(0, {m.num_embeddings}, (1, 8), device={str(model_device(model))!r}) "
                    f"(its first layer is Embedding({m.num_embeddings}, {m.embedding_dim}), which "
                    "takes integer indices)")
        if isinstance(m, nn.Linear):
            return f"torch.randn(1, {m.in_features}) (its first layer is Linear({m.in_features}, ...){where})"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = m.weight.dim() - 2
            size = ", ".join(["224"] * dims if dims < 3 else ["16", "112", "112"])
            return (f"torch.randn(1, {m.in_channels}, {size}) (its first layer is "
                    f"{type(m).__name__}({m.in_channels}, ...), which takes (N, {m.in_channels}, "
                    f"{', '.join('DHW'[3 - dims:])}){where})")
    return "a batch shaped like the model's input, e.g. torch.randn(1, 3, 224, 224)"


def bad_example_input(fn: str, model: nn.Module, example_input: Any, error: BaseException,
                      argument: str = "example_input") -> ValueError:
    """The error for an input the model cannot run (``argument`` names it): what was passed,
    what failed, and an input of the shape the model's first layer takes."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ValueError(
        f"{fn}: {argument} does not run through {type(model).__name__}: you passed "
        f"{_describe(example_input)}, and the forward pass failed with {type(error).__name__}: "
        f"{text[:300]}. Pass a batch shaped like the model's input, on its device and dtype, "
        f"e.g. {_expected_input(model)}; a tuple passes several forward arguments")


@torch.no_grad()
def first_output(fn: str, model: nn.Module, x: Tensor, argument: str) -> Any:
    """``model(x[:1])``: the first data batch of ``fn`` tried on one sample (two where a batch
    norm on batch statistics refuses one), so that data of a shape the model cannot take is
    ``argument``'s error (:func:`bad_example_input`), not a raw torch error from deep inside a
    layer. The caller sets the model's mode."""
    try:
        try:
            return model(x[:1])
        except Exception as exc:
            if not (_needs_two_rows(exc) and len(x) > 1):
                raise
        return model(x[:2])
    except Exception as exc:
        raise bad_example_input(fn, model, x, exc, argument) from exc


def _needs_two_rows(error: BaseException) -> bool:
    """A batch norm on batch statistics (training mode, or ``track_running_stats=False``)
    refusing a batch of one."""
    return "more than 1 value per channel" in str(error)


def probe(model: nn.Module, args: tuple) -> _Run:
    """One pass under ``no_grad`` in the model's own mode (buffers, modes and RNG restored):
    its outputs and ReLU applications. Discovery by running (cheaper than an fx trace), and
    the self-check's reference pass unless gradients must be compared (:func:`add_gradients`)."""
    return _run(model, args, grads=False)


def reference_run(model: nn.Module, example_input: Any, fn: str = "cap_relus"
                  ) -> tuple[tuple | None, Any, str]:
    """(arguments, the unconverted model's :func:`probe` pass, or None and why there is none):
    ``example_input`` must run; a synthesised input that does not run means no check."""
    if example_input is not None:
        args = _as_args(example_input, model, fn)
        ref = probe(model, args)
        if ref.error is not None:
            raise bad_example_input(fn, model, example_input, ref.error) from ref.error
        return args, ref, ""
    return _first_that_runs(model, probe)


def probe_run(model: nn.Module, example_input: Any, fn: str) -> _Run | None:
    """:func:`probe` on ``example_input`` (which must run) or on a synthesised input (None if
    none runs)."""
    return reference_run(model, example_input, fn)[1]


def add_gradients(model: nn.Module, ref: _Run, args: tuple, fn: str) -> None:
    """Make ``ref`` (a :func:`probe` pass of the unconverted ``model``) a pass with autograd,
    in place: the self-check compares the parameters gradients reach only where a forward
    was regenerated or wrapped, and needs the original's for that."""
    got = _run(model, args, grads=True)
    if got.error is not None:
        raise ValueError(
            f"{fn}: the self-check's input runs through {type(model).__name__} under no_grad but "
            f"not with autograd ({type(got.error).__name__}: {str(got.error)[:300]}), so the "
            "gradients of the converted forward cannot be compared. Pass an example_input that "
            "runs with autograd (not one modified in place by the model)") from got.error
    vars(ref).update(vars(got))


def check(converted: nn.Module, ref: _Run, args: tuple, installed: dict[nn.Module, tuple],
          all_sites: bool, fn: str, grads: bool, converted_calls: int | None = None,
          replaced: frozenset[int] = frozenset()) -> tuple[str, list[str]]:
    """Compare ``converted`` at ``cap=inf`` semantics with ``ref``; raise on any difference.

    ``installed`` maps each new activation to ``(site name, upper, inplace)``; ``all_sites``:
    every site found was converted, so no plain ReLU may remain (except inside torch.nn layers,
    which get a note). ``grads``: compare the parameters gradients reach too (``ref`` must
    have them, :func:`add_gradients`); both passes run with autograd then, else under
    ``no_grad``. ``converted_calls``: how many ReLU applications of the reference pass belong
    to converted sites; exactly that many must run through new activations (a site's ReLU
    applied through a reference the conversion cannot reach would otherwise stay plain, with
    the same outputs at ``cap=inf``); None where the sites were found on another input.
    ``replaced``: ids of the modules swapped out, none of which may apply a ReLU any more.
    Returns a one-line summary and the notes.
    """
    if grads and ref.grads is None:  # the caller decided before converting; say so if it differs
        raise ConversionCheckError(
            f"{fn}: a forward was regenerated or wrapped, but the original's reference pass ran "
            "without autograd, so gradients cannot be compared. Nothing was returned; report this "
            "with the model, or pass mode='modules'")
    ops = {m: _plain_op(upper, inplace, m, site) for m, (site, upper, inplace) in installed.items()}
    with _plain_caps(converted, ops):
        got = _run(converted, args, grads)
    if isinstance(got.error, _CapsDoNotFit):
        raise ValueError(f"{fn}: {got.error}") from None
    if got.error is not None:
        raise ConversionCheckError(
            f"{fn}: the converted model fails where the original runs: "
            f"{type(got.error).__name__}: {got.error}. Nothing was returned; report this with "
            "the model, or pass mode='modules' / fewer sites"
        ) from got.error
    # ReLUs inside activations of this package a model already holds are no sites (discovery
    # skips them too) and stay as they are: not left over
    leftover = [(c.module, c.where) for c in got.calls if _is_site_call(c)]
    inside = sum(1 for c in got.calls if c.installed)
    stale = _stale(got.calls, converted) if leftover else []
    unreachable = (
        f"; the model applies a ReLU module that is not in its module tree: "
        f"{_where(stale, converted)}. It calls the module through a reference the swap cannot "
        "reach (a Python list, a functools.partial, a closure): call it through the attribute "
        "it is registered under (self.act(x)), or leave its site out with sites=") if stale else ""
    bypassed = sum(1 for m, _ in stale if id(m) in replaced)
    expected = inside + bypassed if converted_calls is None else converted_calls
    if inside != expected or bypassed:
        raise ConversionCheckError(
            f"{fn}: {expected} ReLU application(s) of the converted sites should run "
            f"through their new activations at cap=inf, {inside} did" + (unreachable or (
                f"; plain ReLUs left: {_where(leftover, converted) or 'none'}. Report this with "
                "the model; convert fewer sites meanwhile")))
    hidden = [(m, w) for m, w in leftover if _inside_torch_layer(m)]
    notes = []
    if hidden:
        notes.append(
            f"{fn}: {len(hidden)} ReLU application(s) inside torch.nn layers are not sites and "
            f"stay plain: {_where(hidden, converted)} (docs/surgery.md, Hidden ReLUs)")
    if got.relu_like:  # the lines of the user's own forward (the reference pass) where it has them
        notes.append(relu_like_note(fn, ref.relu_like or got.relu_like, converted))
    if all_sites and len(leftover) > len(hidden):
        leftover = [c for c in leftover if c not in hidden]
        raise ConversionCheckError(
            f"{fn}: {len(leftover)} ReLU application(s) were not converted although every site "
            f"was selected" + (unreachable or (
                f": {_where(leftover, converted)}. These ReLUs are invisible to the discovery "
                "used (mode='modules' lists nn.ReLU/nn.ReLU6 modules only): use mode='auto', "
                "which finds functional ReLUs and caps them by fx or at run time"))
        )
    if len(got.calls) != len(ref.calls):
        raise ConversionCheckError(
            f"{fn}: the converted model applies {len(got.calls)} ReLUs at cap=inf, the original "
            f"{len(ref.calls)}; not converted: {_where(leftover, converted) or 'none'}. Report this "
            "with the model; convert fewer sites meanwhile"
        )
    _compare_outputs(ref, got, fn, grads)
    if grads and ref.grads != got.grads:
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
    gradients = (f"gradients reach the same {len(ref.grads)} parameters" if grads else
                 "gradients not compared (no forward regenerated or wrapped)")
    return (f"passed at cap=inf: {values}, same dtypes, {gradients}, {len(got.calls)} ReLU "
            f"applications, {inside} through new activations"), notes


def relu_like_note(fn: str, calls: list[tuple[nn.Module | None, str]], model: nn.Module) -> str:
    """What to say about ReLUs written another way (``clamp(min=0)``, ``maximum(x, 0)``, ...)."""
    return (f"{fn}: {len(calls)} ReLU application(s) written as {RELU_LIKE_FORMS} are not sites "
            f"and stay uncapped: {_where(calls, model)}. Write them as F.relu or nn.ReLU to cap "
            "them (a clamp on the input itself needs nothing)")


def _stale(calls: list[_Application], model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The plain ReLU applications made by a module outside ``model``'s tree (reached through
    a list, a partial, a closure), each with the module that called it."""
    paths = _first_paths(model)
    return [(c.module, c.where or (f"a call from {_label(paths[c.caller])} "
                                   f"({type(c.caller).__name__})" if c.caller in paths else ""))
            for c in calls if _is_site_call(c) and c.module is not None and c.module not in paths]


def _inside_torch_layer(m: nn.Module | None) -> bool:
    """A layer of torch.nn applying a ReLU inside itself (TransformerEncoderLayer)."""
    return m is not None and type(m).__module__.startswith("torch.nn.") and (
        type(m) not in (nn.ReLU, nn.ReLU6))


def _where(calls: list[tuple[nn.Module | None, str]], model: nn.Module) -> str:
    names = _first_paths(model)
    parts = list(dict.fromkeys(
        (f"in {_label(names.get(m, '?'))} ({type(m).__name__})" if m is not None else "")
        + (f" at {where}" if where else "") for m, where in calls))
    return "; ".join(parts[:5]) + (f"; ... ({len(parts) - 5} more)" if len(parts) > 5 else "")


def _label(path: str) -> str:
    return repr(path) if path else "the model itself"


def _compare_outputs(ref: _Run, got: _Run, fn: str, regenerated: bool) -> None:
    """``regenerated``: a forward was regenerated or wrapped (else every site was a module
    swap, and the user's forwards ran unchanged)."""
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
            why = ("a regenerated forward changed what the model computes); report this with "
                   "the model, and convert the sites of other owners meanwhile" if regenerated else
                   "every site was a module swap, so the model's code depends on the activation "
                   "module itself: its type, its attributes, or state it keeps); convert the "
                   "sites of the modules that inspect their activation by path, or report this "
                   "with the model")
            raise ConversionCheckError(
                f"{fn}: at cap=inf output {k} of the converted model differs from the "
                f"original's ({why}")
