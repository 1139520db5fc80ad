"""Model factories: structure, activation argument, init scale, bad input, a CNN that learns."""

import math

import pytest
import torch
from torch import nn

from relucap_plugin.activations import CappedReLU, LearnableCappedReLU
from relucap_plugin.models import mlp, scale_init, small_cnn
from relucap_plugin.training import accuracy, train


def test_mlp_default_is_a_bottleneck_net_with_fresh_activations():
    model = mlp(activation="capped_relu(cap=0.1)")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 256), (256, 32), (32, 256), (256, 10)]
    acts = [m for m in model if isinstance(m, CappedReLU)]
    assert len(acts) == 3 and all(a.cap == 0.1 for a in acts)
    assert len({id(a) for a in acts}) == 3
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_takes_class_and_flat_input():
    model = mlp(widths=(16,), activation=LearnableCappedReLU, in_shape=(100,), num_classes=2)
    assert model(torch.rand(3, 100)).shape == (3, 2)
    assert sum(isinstance(m, LearnableCappedReLU) for m in model) == 1
    with pytest.raises(TypeError, match="name, spec string or class"):
        mlp(activation=nn.ReLU())
    with pytest.raises(ValueError, match="widths"):
        mlp(widths=())


@pytest.mark.parametrize("factory", [mlp, small_cnn])
def test_init_scale_multiplies_the_default_initialisation(factory):
    torch.manual_seed(0)
    base = factory()
    torch.manual_seed(0)
    small = factory(init_scale=0.05)
    for (name, a), (_, b) in zip(base.named_parameters(), small.named_parameters()):
        assert torch.allclose(a * 0.05, b), name
    torch.manual_seed(0)
    same = factory(init_scale=1)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), same.parameters()))


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "0.1"])
def test_init_scale_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="init_scale must be a finite number > 0"):
        mlp(init_scale=bad)


def test_scale_init_touches_linear_and_conv_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="forward pass"):
        scale_init(model, 2.0)
    model(torch.rand(1, 1, 5, 5))
    bn_before = model[1].weight.detach().clone()
    conv_before = model[0].weight.detach().clone()
    assert scale_init(model, 2.0) is model
    assert torch.equal(model[1].weight, bn_before)
    assert torch.allclose(model[0].weight, 2 * conv_before)
    assert model[3].weight.abs().max() > 1 / 18 ** 0.5  # beyond the default bound 1/sqrt(fan_in)


@pytest.mark.parametrize(
    "kwargs, out_shape, n_acts",
    [
        ({}, (2, 10), 3),
        ({"hidden": 0}, (2, 10), 2),
        ({"in_shape": (3, 32, 32), "channels": (8, 8, 8), "num_classes": 5}, (2, 5), 4),
    ],
)
def test_small_cnn_shapes(kwargs, out_shape, n_acts):
    model = small_cnn(activation="capped_relu(cap=1)", **kwargs)
    in_shape = kwargs.get("in_shape", (1, 28, 28))
    assert model(torch.rand(2, *in_shape)).shape == out_shape
    acts = [m for m in model if isinstance(m, CappedReLU)]
    assert len(acts) == n_acts and len({id(a) for a in acts}) == n_acts


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"channels": ()}, "channels must be a non-empty sequence"),
        ({"channels": (8, 0)}, "channels must be a non-empty sequence"),
        ({"in_shape": (28, 28)}, r"in_shape must be \(C, H, W\)"),
        ({"in_shape": (1, 8, 8), "channels": (4, 4, 4, 4)}, "cannot be halved 4 times"),
        ({"hidden": -1}, "hidden must be an int >= 0"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_small_cnn_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        small_cnn(**kwargs)


def test_small_cnn_rejects_a_module_instance():
    with pytest.raises(TypeError, match="spec string or class"):
        small_cnn(activation=nn.ReLU())


def test_small_cnn_learns_mnist_subset(mnist5k):
    train_set, test_set = mnist5k
    x, y = train_set.tensors
    torch.manual_seed(0)
    model = small_cnn(channels=(8, 16), hidden=32)
    train(model, (x[:2000], y[:2000]), epochs=2, lr=3e-3, batch_size=32, progress=False)
    assert accuracy(model, test_set) >= 0.8  # measured 0.85-0.91 over seeds 0-3
