"""The runtime path (our own design): functional ReLUs capped at their call site while the
owner's own forward code runs unchanged.

The owner's forward is wrapped, not rewritten: during each call of the owner a torch function
mode is active; the k-th ReLU application made by the owner's own code (its forward, its
methods, or plain functions they call; not its child modules) in that call is site ``k`` and goes
through the activation installed for it, a child module of the owner. Context managers,
data-dependent control flow and untraceable layers in the forward stay exactly as written.
Cost: every torch call inside the owner passes through one Python function.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

from ._codegen import _GeneratedForward
from ._records import _class_codes
from .recorder import _INPLACE_CALLS, _RELU_CALLS, _calling_module

class _Intercept(TorchFunctionMode):
    """Active during one call of ``owner``: routes its k-th ReLU application to ``table[k]``."""

    def __init__(self, owner: nn.Module, table: dict[int, nn.Module]):
        super().__init__()
        self.owner = owner
        self.table = table
        self.k = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_CALLS and _calling_module()[0] is self.owner:
            k, self.k = self.k, self.k + 1
            new = self.table.get(k)
            if new is not None:
                x = args[0] if args else kwargs.get("input", kwargs.get("self"))
                inplace = func in _INPLACE_CALLS or bool(
                    kwargs.get("inplace", args[1] if len(args) > 1 else False))
                out = new(x)
                if inplace and out is not x:
                    return x.copy_(out)
                return out
        return func(*args, **kwargs)


class _InterceptedForward:
    """The owner's own forward, run with :class:`_Intercept`; set on the owner instance.

    ``table`` maps the occurrence k to the attribute of the owner holding the new activation;
    ``function`` is a forward that was set on the instance before (None: the class's), kept as
    a plain function so that the wrapper pickles and deep-copies with its module.
    """

    __slots__ = ("module", "table", "function")

    def __init__(self, module: nn.Module, table: dict[int, str], function: Any = None):
        self.module = module
        self.table = table
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        table = {k: module._modules[attr] for k, attr in self.table.items()}
        function = self.function
        with _Intercept(module, table):
            if function is None:
                return type(module).forward(module, *args, **kwargs)
            if isinstance(function, _GeneratedForward):
                return function(*args, **kwargs)
            return function(module, *args, **kwargs)

    def __reduce__(self):
        return _InterceptedForward, (self.module, self.table, self.function)

    def __deepcopy__(self, memo: dict[int, Any]) -> _InterceptedForward:
        import copy

        return _InterceptedForward(copy.deepcopy(self.module, memo), dict(self.table),
                                   copy.deepcopy(self.function, memo))

    def __repr__(self) -> str:
        return (f"<forward of {type(self.module).__name__} with {len(self.table)} ReLU call "
                "site(s) capped at run time by relucap_plugin>")


def wrap_forward(owner: nn.Module, table: dict[int, str]) -> _InterceptedForward:
    """The wrapper for ``owner``'s current forward (class forward, or one set on the instance)."""
    own = owner.__dict__.get("forward")
    if own is None or (isinstance(own, _GeneratedForward) and own.module is owner):
        function = own
    elif getattr(own, "__self__", None) is owner:
        function = own.__func__
    else:
        raise TypeError(
            f"{type(owner).__name__} has a forward set on the instance that is not a method of "
            "it; its ReLUs cannot be capped at run time. Remove it or use mode='modules'")
    return _InterceptedForward(owner, table, function)


@functools.cache
def has_with_block(cls: type) -> bool:
    """True if a method of ``cls`` (below nn.Module) opens a ``with`` block: fx would run the
    block's body but drop its enter/exit (no_grad, autocast, ...) from a regenerated forward."""
    import dis

    return any(ins.opname in ("BEFORE_WITH", "SETUP_WITH", "SETUP_ASYNC_WITH")
               for code in _class_codes(cls) for ins in dis.get_instructions(code))
