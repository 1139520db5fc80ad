"""Registry: names, safe string specs, user registration and entry-point plugins."""

import math
import textwrap

import pytest
import torch
from torch import nn

from relucap_plugin import CappedReLU, create_activation, list_activations, parse_spec, register_activation
from relucap_plugin import registry


@pytest.fixture
def clean_registry(monkeypatch):
    """Registry and entry-point state restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_name_kwargs_and_spec_string_build_the_same_module():
    a = create_activation("capped_relu", cap=0.1)
    b = create_activation("capped_relu(cap=0.1)")
    c = create_activation(CappedReLU, cap=0.1)
    d = create_activation("Capped_ReLU(0.1)")
    for m in (a, b, c, d):
        assert isinstance(m, CappedReLU) and m.cap == 0.1


def test_keyword_arguments_override_the_spec():
    assert create_activation("capped_relu(cap=0.1)", cap=2.0).cap == 2.0


def test_spec_literals():
    assert parse_spec("capped_relu(cap=inf)") == ("capped_relu", [], {"cap": math.inf})
    assert parse_spec("x(a=[1, 2.5], b=-3, c=True, d=None, e='s')") == (
        "x", [], {"a": [1, 2.5], "b": -3, "c": True, "d": None, "e": "s"})
    assert create_activation("capped_relu(cap=inf)").cap == math.inf
    assert torch.equal(create_activation("capped_relu(cap=[0.5, 1])").cap, torch.tensor([0.5, 1.0]))


def test_every_registered_spec_round_trips():
    for name in list_activations():
        module = create_activation(name)
        spec = getattr(module, "spec", name)
        again = create_activation(spec)
        assert type(again) is type(module), name
        assert getattr(again, "spec", name) == spec, name


@pytest.mark.parametrize(
    "spec",
    [
        "__import__('os').system('touch PWNED')",
        "capped_relu(cap=__import__('os').getpid())",
        "capped_relu(cap=1+1)",
        "capped_relu(**{'cap': 1})",
        "os.path",
        "capped_relu(cap=",
        "",
    ],
)
def test_specs_are_parsed_never_evaluated(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):
        create_activation(spec)
    assert not (tmp_path / "PWNED").exists()


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as info:
        create_activation("capped_reluu(cap=1)")
    message = str(info.value)
    assert "unknown activation 'capped_reluu'" in message
    for name in ("capped_relu", "pssilu", "learnable_capped_relu"):
        assert name in message


def test_bad_parameter_lists_accepted_ones():
    with pytest.raises(TypeError) as info:
        create_activation("capped_relu(cpa=0.1)")
    assert "cpa" in str(info.value) and "accepts: cap, inplace" in str(info.value)


@pytest.mark.parametrize(
    "spec, exc", [("capped_relu(cap=0)", ValueError), ("capped_relu(cap=nan)", ValueError),
                  ("capped_relu(cap=-1)", ValueError), ("capped_relu(cap='a')", TypeError)]
)
def test_bad_cap_through_the_registry(spec, exc):
    with pytest.raises(exc, match="positive float"):
        create_activation(spec)


def test_non_spec_object_is_a_type_error():
    with pytest.raises(TypeError, match="registered names"):
        create_activation(3.5)


def test_module_instance_passes_through():
    m = CappedReLU(1.0)
    assert create_activation(m) is m
    with pytest.raises(TypeError):
        create_activation(m, cap=2)


def test_register_activation_decorator(clean_registry):
    @register_activation("twice_relu")
    class TwiceReLU(nn.Module):
        def __init__(self, factor: float = 2.0):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return self.factor * torch.relu(x)

    assert "twice_relu" in list_activations()
    m = create_activation("twice_relu(factor=3)")
    assert torch.equal(m(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="already registered"):
        register_activation("twice_relu", nn.ReLU)
    register_activation("twice_relu", nn.ReLU, overwrite=True)
    assert isinstance(create_activation("twice_relu"), nn.ReLU)


def test_register_rejects_bad_names_and_factories(clean_registry):
    with pytest.raises(ValueError, match="identifier"):
        register_activation("bad name", nn.ReLU)
    with pytest.raises(TypeError, match="callable"):
        register_activation("ok_name", 3)

    def not_a_module():
        return 3

    register_activation("not_a_module", not_a_module)
    with pytest.raises(TypeError, match="not an nn.Module"):
        create_activation("not_a_module")


def _write_dist(site, name, entry_points):
    """A minimal installed distribution: a dist-info folder with entry_points.txt, and a module."""
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, clean_registry):
    (tmp_path / "relucap_dummy_plugin.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class HalfReLU(nn.Module):
            def forward(self, x):
                return 0.5 * torch.relu(x)
    """))
    _write_dist(tmp_path, "relucap_dummy_plugin", textwrap.dedent("""
        [relucap_plugin.activations]
        half_relu = relucap_dummy_plugin:HalfReLU
        broken_act = relucap_dummy_plugin:DoesNotExist
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="broken_act"):
        names = list_activations()
    assert "half_relu" in names and "broken_act" not in names
    m = create_activation("half_relu")
    assert torch.equal(m(torch.tensor([-2.0, 4.0])), torch.tensor([0.0, 2.0]))
