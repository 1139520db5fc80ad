"""ThreatModel and EvalConfig: normalisation, validation with actionable errors, round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from relucap_plugin.threat import EvalConfig, ThreatModel


@pytest.mark.parametrize(
    ("given", "expected"),
    [("Linf", "Linf"), ("linf", "Linf"), ("inf", "Linf"), ("INF", "Linf"), (math.inf, "Linf"),
     ("L2", "L2"), ("l2", "L2"), (2, "L2")],
)
def test_norm_is_normalised(given, expected):
    assert ThreatModel(given, 0.1).norm == expected


@pytest.mark.parametrize(
    ("eps", "expected"),
    [(0.3, (0.3,)), (1, (1.0,)), ([0.1, 0.3], (0.1, 0.3)), ((0.0, 0.2), (0.0, 0.2)),
     (torch.tensor([0.1, 0.2]), (pytest.approx(0.1), pytest.approx(0.2)))],
)
def test_eps_becomes_a_tuple_of_floats(eps, expected):
    tm = ThreatModel("Linf", eps)
    assert tm.eps == expected
    assert all(isinstance(e, float) for e in tm.eps)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": "L1", "eps": 0.1}, ValueError, "norm must be one of Linf, L2"),
        ({"norm": "Linf", "eps": -0.1}, ValueError, "eps must be finite and >= 0"),
        ({"norm": "Linf", "eps": math.nan}, ValueError, "eps must be finite"),
        ({"norm": "Linf", "eps": ()}, ValueError, "at least one budget"),
        ({"norm": "Linf", "eps": "0.3"}, TypeError, "eps must be a number"),
        ({"norm": "Linf", "eps": 1.5}, ValueError, r"exceeds the input range 1.0.*Use eps <= 1.0"),
        ({"norm": "Linf", "eps": 0.1, "bounds": (1, 0)}, ValueError, "low < high"),
        ({"norm": "Linf", "eps": 0.1, "bounds": (0, 1, 2)}, TypeError, "pair of numbers"),
        ({"norm": "Linf", "eps": 0.1, "steps": 0}, ValueError, "steps must be an int >= 1"),
        ({"norm": "Linf", "eps": 0.1, "steps": 2.5}, ValueError, "steps must be an int >= 1"),
        ({"norm": "Linf", "eps": 0.1, "restarts": 0}, ValueError, "restarts must be an int >= 1"),
        ({"norm": "Linf", "eps": 0.1, "step_size": 0}, ValueError, r"step_size must be > 0 or None"),
        ({"norm": "Linf", "eps": 0.1, "random_start": 1}, TypeError, "random_start must be True or False"),
        ({"norm": "Linf", "eps": 0.1, "loss": "hinge"}, ValueError, "loss must be one of ce, dlr, margin"),
    ],
)
def test_bad_threat_models_say_what_to_do(kwargs, error, match):
    with pytest.raises(error, match=match):
        ThreatModel(**kwargs)


def test_l2_budget_may_exceed_the_pixel_range():
    assert ThreatModel("L2", 3.0).eps == (3.0,)


def test_loss_is_case_insensitive():
    assert ThreatModel("Linf", 0.1, loss="DLR").loss == "dlr"


def test_default_step_size_is_madry_rule_and_explicit_one_wins():
    tm = ThreatModel("Linf", (0.1, 0.3), steps=40)
    assert tm.step_size_for(0.3) == pytest.approx(2.5 * 0.3 / 40)
    assert tm.step_size_for(0.1) == pytest.approx(2.5 * 0.1 / 40)
    assert tm.replace(step_size=0.01).step_size_for(0.3) == 0.01


def test_threat_model_is_frozen_and_replace_validates():
    tm = ThreatModel("Linf", 0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tm.steps = 3
    assert tm.replace(steps=3).steps == 3 and tm.steps == 40
    with pytest.raises(ValueError, match="steps"):
        tm.replace(steps=0)
    assert tm.with_eps((0.1, 0.2)).eps == (0.1, 0.2)
    assert tm.p == math.inf and ThreatModel("l2", 1).p == 2.0


def test_threat_model_round_trips_through_json():
    tm = ThreatModel("l2", [0.5, 1.0], bounds=(-1, 1), steps=7, step_size=0.1, restarts=2,
                     random_start=False, targeted=True, loss="margin")
    data = json.loads(json.dumps(tm.to_dict()))
    assert data["norm"] == "L2" and data["eps"] == [0.5, 1.0]
    assert ThreatModel.from_dict(data) == tm


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown ThreatModel field\(s\) \['epsilon'\]"):
        ThreatModel.from_dict({"norm": "Linf", "epsilon": 0.3})


def test_eval_config_defaults_and_round_trip():
    cfg = EvalConfig()
    assert (cfg.batch_size, cfg.device, cfg.seed, cfg.n_samples) == (256, "auto", 0, None)
    again = EvalConfig.from_dict(json.loads(json.dumps(EvalConfig(batch_size=8, device="CPU", n_samples=5).to_dict())))
    assert again == EvalConfig(batch_size=8, device="cpu", n_samples=5)


def test_auto_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EvalConfig().resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available; use device='auto' or 'cpu'"):
        EvalConfig(device="cuda").resolve_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EvalConfig().resolve_device() == torch.device("cuda")
    assert EvalConfig(device="cuda:1").resolve_device() == torch.device("cuda:1")
    assert EvalConfig(device=torch.device("cpu")).resolve_device() == torch.device("cpu")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"device": "tpu"}, ValueError, "device must be one of auto, cpu, cuda"),
        ({"device": 0}, TypeError, "device must be a string"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"n_samples": 0}, ValueError, "n_samples must be an int >= 1 or None"),
    ],
)
def test_bad_eval_configs(kwargs, error, match):
    with pytest.raises(error, match=match):
        EvalConfig(**kwargs)
