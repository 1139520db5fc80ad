"""Untrusted files and strings execute nothing: checkpoints and data files load weights-only,
model factories import only the module the user names, and specs are parsed, never eval'ed.

Every payload here would create a marker file if it ran; each test first shows that the payload
is live (plain ``pickle.load`` runs it), then that the package refuses it and the marker does
not exist.
"""

import builtins
import pickle
import sys

import pytest
import torch

from relucap_plugin.attacks import get_attack, parse_attack
from relucap_plugin.cli import _load_model, main
from relucap_plugin.models import mlp
from relucap_plugin.registry import create_activation
from relucap_plugin.surgery import cap_relus
from relucap_plugin.threat import ThreatModel
from relucap_plugin.training import load_checkpoint


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the pickle is executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def malicious_checkpoint(path, marker):
    state = {k: v for k, v in mlp((16,)).state_dict().items()}
    state["0.payload"] = Payload(marker)
    with open(path, "wb") as f:
        pickle.dump(state, f)


def test_the_payload_is_live_when_unpickled(tmp_path):
    malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "control")
    with open(tmp_path / "evil.pt", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "control").exists()


def test_load_checkpoint_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / "evil.pt", marker)
    model = mlp((16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="is not a weights-only torch state dict.*save it with save_checkpoint"):
        load_checkpoint(model, tmp_path / "evil.pt")
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("option", ["--checkpoint", "--data"])
def test_cli_refuses_a_malicious_pickle(option, tmp_path, capsys):
    marker = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / "evil.pt", marker)
    code = main(["evaluate", "mlp:16", option, str(tmp_path / "evil.pt"), "--attack", "torch:FGSM",
                 "--eps", "0.1", "--n-samples", "4", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "weights-only" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package ``userpkg`` with a factory module and a sibling that would leave a marker."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from relucap_plugin.models import mlp, register_model\n\n@register_model\ndef small():\n    return mlp((8,))\n"
    )
    marker = tmp_path / "sibling-imported"
    (pkg / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


def test_model_factory_imports_only_the_named_module(user_package):
    model = _load_model("userpkg.nets:small")
    assert model[1].out_features == 8
    assert "userpkg.nets" in sys.modules and "userpkg.evil" not in sys.modules
    assert not user_package.exists()


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("userpkg.nets:small()", ValueError, "write package.module:factory"),
        ("userpkg.nets:__import__('os')", ValueError, "write package.module:factory"),
        ("__import__('os').system('x'):small", ImportError, "No module named"),
        ("userpkg.nets:missing", ValueError, "has no callable 'missing'"),
        ("userpkg:evil", ValueError, "userpkg has no callable 'evil'"),  # a name, not an import
    ],
)
def test_model_factory_strings_are_names_not_code(spec, error, words, user_package):
    with pytest.raises(error, match=words):
        _load_model(spec)
    assert "userpkg.evil" not in sys.modules and not user_package.exists()


def payloads(marker):
    code = f"__import__('builtins').open({str(marker)!r}, 'w')"
    return [
        f"capped_relu(cap={code})",
        f"capped_relu(cap=[{code}])",
        f"{code}",
        f"capped_relu(cap=0.1, **{{'x': {code}}})",
        f"capped_relu(cap=(lambda: {code})())",
    ]


def test_activation_specs_are_parsed_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    net = mlp((8,))
    for spec in payloads(marker):
        with pytest.raises((ValueError, TypeError)):
            create_activation(spec)
        with pytest.raises((ValueError, TypeError)):
            cap_relus(net, spec)
    assert not marker.exists()


def test_attack_specs_are_parsed_never_evaluated(tmp_path, capsys):
    marker = tmp_path / "pwned"
    code = f"__import__('builtins').open({str(marker)!r}, 'w')"
    tm = ThreatModel("Linf", eps=0.1)
    specs = [f"torch:PGD(steps={code})", f"torch:PGD(loss={code})", f"torch:{code}",
             f"torch:PGD(**{{'steps': {code}}})", f"torch:PGD(steps=1, step_size=[{code}])"]
    for spec in specs:
        with pytest.raises(ValueError):
            parse_attack(spec)
        with pytest.raises(ValueError):
            get_attack(spec, tm)
        code_cli = main(["evaluate", "mlp:8", "--attack", spec, "--eps", "0.1", "--n-samples", "2",
                         "--quiet", "--out", str(tmp_path / "out")])
        assert code_cli == 2
    cli_model = main(["evaluate", f"mlp:8:capped_relu(cap={code})", "--attack", "torch:FGSM",
                      "--eps", "0.1", "--n-samples", "2", "--quiet", "--out", str(tmp_path / "out")])
    assert cli_model == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()
