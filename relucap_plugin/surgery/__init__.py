"""Model surgery: find every ReLU application in a model and swap chosen ones for capped ones.

A *site* is one application of ReLU in one forward pass: an ``nn.ReLU``/``nn.ReLU6`` module
call (exact types: ``nn.ReLU6`` subclasses ``nn.Hardtanh``, which is not a ReLU), an
``F.relu``/``torch.relu``/``torch.relu_``/``F.relu6`` call, or an ``x.relu()``/``x.relu_()``
call. A ResNet block that calls one ``self.relu`` twice has two sites.

Sites are found by tracing the model with ``torch.fx`` (``mode="auto"``), or, for models fx
cannot trace, by listing the ReLU modules (``mode="modules"``). Conversion replaces module
instances when every call of an instance gets the same activation; otherwise it rewrites the
forward of the module that applies the ReLU (its *owner*) with fx, so each call site gets its
own activation. See ``docs/surgery.md`` for the rules and the limits.
"""

from ._codegen import _rebuild_forward  # noqa: F401  models pickled before the split name it here
from ._records import (
    CapReport,
    ConversionCheckError,
    ReluSite,
    UntraceableModelError,
    is_converted,
    uncap,
)
from .calibrate import calibrate_caps
from .convert import cap_relus
from .sites import _trace, find_relus, print_sites  # noqa: F401

__all__ = [
    "CapReport",
    "ConversionCheckError",
    "ReluSite",
    "UntraceableModelError",
    "calibrate_caps",
    "cap_relus",
    "find_relus",
    "print_sites",
    "is_converted",
    "uncap",
]
