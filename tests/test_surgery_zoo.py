"""Zoo test of surgery on models nobody here wrote (issue 13): timm, torchvision detection,
segmentation, video and optical-flow models, segmentation_models_pytorch.

Each model is converted with ``cap=0.5`` and checked against an independent count of its ReLU
applications (``count_relu_applications`` of test_surgery.py: a TorchFunctionMode over the
relu family plus hooks on nn.ReLU6): every application is converted, every new activation is
called exactly as often, and the converted model applies no plain ReLU any more. The
conversion's own self-check must have passed. Models whose values are not needed run on the
``meta`` device; detection and optical-flow models (data-dependent code) run a tiny real input.

By default a subset runs (``DEFAULT``: one or two models per family, chosen for cost; 26 s on
one core); the whole list, 66 timm ReLU models, 13 torchvision and 5 segmentation_models_pytorch
models, runs with ``RELUCAP_FULL_ZOO=1`` (all pass; 14 min on one core of the loaded 2-core
machine, 7 of them in the four R-CNN/RetinaNet/FCOS models, which run real weights).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from relucap_plugin.surgery import cap_relus
from tests.test_surgery import count_relu_applications

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# timm models that apply ReLU (every one of them counted > 0 applications with timm 1.0.31).
TIMM = (
    "resnet10t resnet14t resnet18 resnet18d resnet26 resnet26d resnet34d resnet50 resnet50d "
    "wide_resnet50_2 resnext50_32x4d seresnet18 seresnet50 ecaresnet26t ecaresnet50t "
    "skresnet18 res2net50_14w_8s resnest14d regnetx_002 regnety_002 densenet121 dla34 dla46_c "
    "dla60x_c dpn48b ghostnet_050 ghostnetv3_050 mobileone_s0 inception_resnet_v2 "
    "inception_v3 inception_v4 vgg11 repvgg_a0 hrnet_w18_small hrnet_w18_small_v2 "
    "selecsls42b mnasnet_050 spnasnet_100 efficientnet_lite0 mobilenetv2_050 fbnetc_100 "
    "semnasnet_050 mobilenetv3_small_050 hardcorenas_a vovnet39a ese_vovnet19b_dw gernet_s "
    "xception41 nf_resnet26 nasnetalarge pnasnet5large tresnet_m repghostnet_050 "
    "legacy_seresnet18 senet154 resnetv2_50 resnetrs50 resnetblur18 resnetaa50 "
    "seresnext26d_32x4d rexnet_100 lcnet_050 mixnet_s tf_mixnet_s gluon_resnet18_v1b "
    "tv_resnet34"
).split()
# name -> (builder, input shape, on meta)
TORCHVISION = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("detection", (3, 64, 64), False),
    "retinanet_resnet50_fpn": ("detection", (3, 64, 64), False),
    "fcos_resnet50_fpn": ("detection", (3, 64, 64), False),
    "maskrcnn_resnet50_fpn": ("detection", (3, 64, 64), False),
    "keypointrcnn_resnet50_fpn": ("detection", (3, 64, 64), False),
    "ssdlite320_mobilenet_v3_large": ("detection", (3, 64, 64), False),
    "fcn_resnet50": ("segmentation", (1, 3, 64, 64), True),
    "deeplabv3_mobilenet_v3_large": ("segmentation", (1, 3, 64, 64), True),
    "lraspp_mobilenet_v3_large": ("segmentation", (1, 3, 64, 64), True),
    "r3d_18": ("video", (1, 3, 4, 32, 32), True),
    "r2plus1d_18": ("video", (1, 3, 4, 32, 32), True),
    "s3d": ("video", (1, 3, 16, 224, 224), True),
    "raft_small": ("optical_flow", (1, 3, 128, 128), False),
}
SMP = ("Unet", "FPN", "PSPNet", "DeepLabV3", "Linknet")
DEFAULT = {
    "timm:resnet10t", "timm:mobilenetv3_small_050", "timm:dla34", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
    "torchvision:lraspp_mobilenet_v3_large", "torchvision:r3d_18", "smp:Unet",
}
ZOO = ([f"timm:{n}" for n in TIMM] + [f"torchvision:{n}" for n in TORCHVISION]
       + [f"smp:{n}" for n in SMP])


def test_zoo_lists():
    assert len(TIMM) >= 60 and len(set(TIMM)) == len(TIMM)
    assert DEFAULT <= set(ZOO)
    assert all(timm.is_model(n) for n in TIMM)


def _build(key: str) -> tuple[nn.Module, object]:
    family, name = key.split(":")
    torch.manual_seed(0)
    if family == "timm":
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        size = 96 if name.startswith(("inception", "xception", "nasnet", "pnasnet")) else 64
        if model.pretrained_cfg.get("fixed_input_size"):
            size = model.pretrained_cfg["input_size"][-1]
        return model.eval(), torch.empty(1, 3, size, size, device="meta")
    if family == "smp":
        smp = pytest.importorskip("segmentation_models_pytorch")
        with torch.device("meta"):
            model = getattr(smp, name)(encoder_name="resnet18", encoder_weights=None)
        return model.eval(), torch.empty(1, 3, 64, 64, device="meta")
    kind, shape, meta = TORCHVISION[name]
    kwargs: dict = {"weights": None}
    if kind in ("detection", "segmentation"):
        kwargs["weights_backbone"] = None
    if kind == "segmentation":
        kwargs["aux_loss"] = None
    device = torch.device("meta" if meta else "cpu")
    with device:
        model = torchvision.models.get_model(name, **kwargs).eval()
    if kind == "detection":
        return model, ([torch.rand(*shape)],)
    x = torch.rand(*shape, device=device)
    return model, ((x, x.clone()) if kind == "optical_flow" else x)


def _count(model, example):
    args = example if isinstance(example, tuple) else (example,)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, _):
            return self.m(*args)

    return count_relu_applications(Wrapper(), None)


@pytest.mark.slow
@pytest.mark.parametrize("key", ZOO)
def test_zoo_models_fully_converted_and_checked(key):
    if key not in DEFAULT and os.environ.get("RELUCAP_FULL_ZOO") != "1":
        pytest.skip("run with RELUCAP_FULL_ZOO=1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, example = _build(key)
        expected = _count(model, example)
        assert expected > 0
        capped, report = cap_relus(model, 0.5, example_input=example)
    assert report.check.startswith("passed"), report.check
    assert report.count == len(report.sites) == expected
    calls = []
    for path in set(report.paths.values()):
        capped.get_submodule(path).register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _count(capped, example) == 0  # no plain ReLU left
    assert len(calls) == expected
