"""Surgery records: what a ReLU site is, what a conversion reports and changed, and the
argument checks every public function runs first."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import types
import warnings
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._torch import all_modules
from ..activations import CappedReLU

_RELU_MODULES: dict[type, str] = {nn.ReLU: "nn.ReLU", nn.ReLU6: "nn.ReLU6"}
# callable -> (label, name token, always in place); F.relu_ is torch.relu_.
_RELU_FUNCTIONS: dict[Any, tuple[str, str, bool]] = {
    F.relu: ("F.relu", "relu", False),
    torch.relu: ("torch.relu", "relu", False),
    torch.relu_: ("torch.relu_", "relu", True),
    F.relu6: ("F.relu6", "relu6", False),
}
_RELU_METHODS: dict[str, tuple[str, str, bool]] = {
    "relu": ("Tensor.relu", "relu", False),
    "relu_": ("Tensor.relu_", "relu", True),
}
_RELU6_OPS = frozenset({"nn.ReLU6", "F.relu6"})
# Activations of this package are never ReLU sites: fx treats them as leaves, not traced into.
_OWN_MODULES = frozenset({CappedReLU.__module__, __package__ + ".calibrate"})
_MARK = "_relucap_site"
_MODES = ("auto", "modules")
_RECORDS = "_relucap_records"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SURGERY_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIST_LIMIT = 60


class UntraceableModelError(ValueError):
    """``torch.fx`` cannot trace the model; the message names the part and what still works."""


class ConversionCheckError(RuntimeError):
    """The converted model failed its self-check (see :func:`cap_relus`); nothing was changed.

    The message names the site or module where the converted model differs from the original
    and what to do about it.
    """


@dataclass(frozen=True)
class ReluSite:
    """One application of ReLU in a forward pass, as found by :func:`find_relus`.

    ``name`` is stable across runs and copies: the module path for module sites, ``owner:relu``
    (or ``owner:relu6``) for function and method sites; a ``#k`` suffix numbers the calls when
    one module (or one owner's ``F.relu``) is applied more than once. ``owner`` is the module
    whose forward applies the ReLU (``""`` = the model itself). ``shape`` and ``width``
    (features of an (N, F) activation, channels of an (N, C, *) one) are known only when
    :func:`find_relus` got an ``example_input``.
    """

    name: str
    index: int
    kind: str
    op: str
    module_path: str
    owner: str
    shared: bool
    inplace: bool
    shape: tuple[int, ...] | None = None
    width: int | None = None

    @property
    def upper(self) -> float:
        """The built-in bound of the site: 6 for ReLU6, ``inf`` for ReLU."""
        return 6.0 if self.op in _RELU6_OPS else math.inf

    @property
    def base_name(self) -> str:
        """``name`` without the ``#k`` call number."""
        return self.name.split("#", 1)[0]


@dataclass
class _Record:
    """Everything one conversion changed, in the order it changed it; ``undo`` reverts it."""

    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    added: list[tuple[nn.Module, str]] = field(default_factory=list)
    forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)
    constants: list[tuple[nn.Module, str]] = field(default_factory=list)
    # (module, forward hook) pairs, not RemovableHandles: a handle whose hooks dict is gone
    # (fuse_model replaced the module) breaks copy.deepcopy of the model (torch 2.14)
    hooks: list[tuple[nn.Module, Any]] = field(default_factory=list)
    installed: list[nn.Module] = field(default_factory=list)  # what took the replaced' places

    def undo(self) -> None:
        for module, hook in reversed(self.hooks):
            for key in [k for k, v in module._forward_hooks.items() if v is hook]:
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        for module, previous in reversed(self.forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        for parent, name in reversed(self.added):
            parent._modules.pop(name, None)
        for module, name in self.constants:
            module.__dict__.pop(name, None)
        changed = []
        for parent, name, old in reversed(self.replaced):
            now = parent._modules.get(name)
            if now is not old and not any(now is m for m in self.installed):
                changed.append(f"{type(parent).__name__}.{name} ({type(now).__name__})")
            parent._modules[name] = old
        if changed:
            warnings.warn(
                f"undoing a conversion put the original ReLU modules back where the model had "
                f"been changed since: {', '.join(changed[:5])}"
                f"{f' and {len(changed) - 5} more' if len(changed) > 5 else ''} held a module "
                "cap_relus did not install, and that change is gone. Make such edits after "
                "uncap, or on the original model", UserWarning, stacklevel=3)


#: The hook dicts of an nn.Module that run when it is called (forward and backward).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_pre_hooks", "_backward_hooks")


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The new activation runs the hooks registered on the ReLU module it replaces.

    A user's forward hook on a ReLU (recording activations, as cap calibration does) would
    otherwise stop firing without a word when the ReLU is swapped. ``new`` shares ``old``'s
    hook dicts (where it has none of its own), so a handle the user holds removes the hook from
    both, and a hook added to the new activation stays on the ReLU that :meth:`CapReport.undo`
    puts back. Every call of ``old`` that now calls a new activation runs them once, as before.
    Our own design."""
    if not any(getattr(old, name, None) for name in _HOOK_DICTS):
        return
    for name in _HOOK_DICTS:  # all of them, also the empty ones: a hook added later spans several
        theirs, mine = getattr(old, name, None), getattr(new, name, None)
        if theirs is None or mine is None:
            continue
        if mine:
            mine.update(theirs)  # the activation's own hooks run first, in a dict of its own
        else:
            new.__dict__[name] = theirs
    if old._backward_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def _positional_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: ``act(input=x)`` (how some models call their ReLU) becomes ``act(x)``."""
    if not args and len(kwargs) == 1:
        return tuple(kwargs.values()), {}
    return args, kwargs


@dataclass
class CapReport:
    """What :func:`cap_relus` did to ``model``.

    ``replaced`` maps each converted site to the spec of its new activation and ``paths`` to
    the module path of that activation in ``model``; ``method`` is ``"modules"`` (instances
    swapped) or ``"fx"`` (the forward of the modules in ``rewritten`` regenerated by fx; ``""``
    is the model itself). ``sites`` lists every site found, converted or not.

    ``how`` maps each converted site to the path it took: ``"module"`` (instance swapped),
    ``"fx"`` (owner forward regenerated) or ``"runtime"`` (capped at its call site while the
    owner's own forward runs unchanged); ``reasons`` says why, for every site not swapped as a
    module. ``check`` is the outcome of the self-check run at ``cap=inf`` semantics.
    """

    model: nn.Module
    replaced: dict[str, str]
    paths: dict[str, str]
    method: str
    rewritten: tuple[str, ...]
    sites: tuple[ReluSite, ...]
    warnings: tuple[str, ...]
    _record: _Record = field(repr=False)
    how: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    check: str = ""

    @property
    def count(self) -> int:
        """Number of sites converted."""
        return len(self.replaced)

    def undo(self) -> nn.Module:
        """Restore ``model`` to its state before this conversion (bit-identical outputs)."""
        records = self.model.__dict__.get(_RECORDS) or []
        if not records or records[-1] is not self._record:
            raise ValueError(
                "this conversion is not the latest one on the model (it was undone already, or "
                "cap_relus ran on the model again since); undo the later reports first, or call "
                "uncap(model) to remove every conversion"
            )
        records.pop().undo()
        if not records:
            self.model.__dict__.pop(_RECORDS, None)
        return self.model

    def print(self, file=None) -> None:
        """Print the converted sites and their new activations as a table."""
        from .._console import print_table

        rows = [(n, spec, self.paths[n], self.how.get(n, ""), self.reasons.get(n, ""))
                for n, spec in self.replaced.items()]
        print_table(
            ["site", "new activation", "module path", "path", "why"], rows,
            title=f"{self.count} of {len(self.sites)} ReLU sites converted ({self.method})",
            file=file,
        )
        if self.check:
            print(f"self-check: {self.check}", file=file)

    def __str__(self) -> str:
        where = f", forward rewritten in {list(self.rewritten)}" if self.rewritten else ""
        return (f"CapReport({self.count} of {len(self.sites)} sites converted by "
                f"{self.method}{where})")


def _check_model(model: object, fn: str) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"{fn}: got a {type(model).__name__} wrapper; pass the wrapped model instead: "
            f"{fn}(model.module, ...), and wrap the converted model again afterwards"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{fn}: got a TorchScript module ({type(model).__name__}); its code cannot be "
            "rewritten. Convert the eager nn.Module first, then script the converted model"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}")
    for m in all_modules(model):
        what = ("a TorchScript module" if isinstance(m, torch.jit.ScriptModule)
                else "a torch.compile wrapper" if _is_compiled(m) else None)
        if what is None:
            continue
        path = _path_of(model, m)
        if not path and what.endswith("wrapper"):
            raise TypeError(
                f"{fn}: got a torch.compile wrapper; pass model._orig_mod (the eager model) "
                "and call torch.compile on the converted model afterwards"
            )
        raise TypeError(
            f"{fn}: submodule {path!r} of {type(model).__name__} is {what} "
            f"({type(m).__name__}); the ReLUs inside it run where no check can see them, so "
            "they can be neither found nor capped. Build the model with the eager module at "
            f"{path!r}, convert, then script or compile the converted model"
        )
    return model


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused inside (left as it was if already paused). A
    conversion creates thousands of dicts and modules, none of them garbage before it returns,
    and every 700 new objects start a collection: on inception_resnet_v2 that is dozens of
    collections and 12-20 ms of ``cap_relus``. Our own design."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _path_of(model: nn.Module, module: nn.Module) -> str:
    """The path ``named_modules`` gives ``module`` (for messages: a walk of its own)."""
    return next(path for path, m in model.named_modules() if m is module)


def _is_compiled(module: nn.Module) -> bool:
    """True for torch.compile's wrapper (``_orig_mod`` is a registered child in torch 2.14,
    an instance attribute in older releases)."""
    inner = module._modules.get("_orig_mod", module.__dict__.get("_orig_mod"))
    return isinstance(inner, nn.Module) and type(module).__module__.startswith("torch._dynamo")


def _check_mode(mode: object) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES} (got {mode!r})")
    return mode  # type: ignore[return-value]


def _name_list(sites: Sequence[ReluSite]) -> str:
    names = [s.name for s in sites]
    text = ", ".join(names[:_LIST_LIMIT])
    if len(names) > _LIST_LIMIT:
        text += f", ... ({len(names) - _LIST_LIMIT} more; print_sites(find_relus(model)) lists all)"
    return text


# --------------------------------------------------------------------------- tracing


def _class_codes(cls: type) -> Iterator[types.CodeType]:
    """Code of the functions defined by ``cls`` and its bases below ``nn.Module``."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                yield code


def _is_installed(module: nn.Module) -> bool:
    """True for activations cap_relus installed (marked, so a later conversion skips them)."""
    return _MARK in module.__dict__


def _site_op(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, str, str, bool] | None:
    """``(kind, label, token, inplace)`` if ``node`` applies a ReLU, else None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        label = _RELU_MODULES.get(type(m)) if m is not None else None
        if label is None:
            return None
        return "module", label, label[3:].lower(), bool(m.inplace)
    if node.op == "call_function":
        try:
            found = _RELU_FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
        if found is None:
            return None
        label, token, always = found
        positional = node.args[1] if len(node.args) > 1 else False
        inplace = always or bool(node.kwargs.get("inplace", positional))
        return "function", label, token, inplace
    if node.op == "call_method" and node.target in _RELU_METHODS:
        label, token, inplace = _RELU_METHODS[node.target]
        return "method", label, token, inplace
    return None


def _site_input(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    for key in ("input", "self"):
        if key in node.kwargs:
            return node.kwargs[key]
    raise ValueError(f"cannot find the input of ReLU node {node.format_node()}")


def _relative(path: str, scope: str) -> str | None:
    if not scope:
        return path
    return path[len(scope) + 1:] if path.startswith(scope + ".") else None


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` carries conversions by :func:`cap_relus` that :func:`uncap` can undo."""
    return bool(getattr(model, "__dict__", {}).get(_RECORDS))


def uncap(model: nn.Module) -> nn.Module:
    """Undo every conversion :func:`cap_relus` made to ``model`` (latest first), in place.

    The original ReLU modules and forwards come back, so outputs are bit-identical to the
    model before capping. Learned cap parameters are dropped with their modules.
    """
    _check_model(model, "uncap")
    records = model.__dict__.get(_RECORDS)
    if not records:
        raise ValueError(
            f"uncap: this {type(model).__name__} carries no conversion by cap_relus (the record "
            "lives on the converted model object). For a model rebuilt from a state_dict, "
            "build the uncapped architecture and load the state_dict into it instead"
        )
    while records:
        records.pop().undo()
    model.__dict__.pop(_RECORDS, None)
    return model
