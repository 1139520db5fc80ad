"""relucap_plugin.experiment and relucap_plugin.report: the demo/reproduce pipeline, tiny budget."""

import json
import math
import os

import pytest
import torch

from relucap_plugin import Results, load_checkpoint
from relucap_plugin.activations import CappedReLU, PSSiLU
from relucap_plugin.cli import main
from relucap_plugin.experiment import (
    LIBRARY_PGD,
    PAPER_CAPS,
    ExperimentResult,
    ModelResult,
    ModelSpec,
    build_model,
    grid,
    pick_best,
    preset,
    run_experiment,
)
from relucap_plugin.report import PLOTS

TINY = dict(caps=(0.1,), positions=("bottleneck",), n_train=600, epochs=1, eps=(0.1,),
            n_samples=24, steps=5, square_queries=20)
MODELS = ["relu", "cap 0.1 bottleneck", "relu +FGSM", "cap 0.1 bottleneck +FGSM", "cap 1 all +IBP"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_experiment(preset("demo", **TINY), out=out, progress=False, keep_models=True), out


def test_tiny_demo_trains_the_grid_then_fgsm_on_relu_and_the_best_cap(tiny):
    result, _ = tiny
    assert [m.name for m in result.models] == MODELS
    assert result.best == "cap 0.1 bottleneck"  # the only capped model of the grid
    relu, capped, relu_at, capped_at, certified = result.models
    assert relu.capped_sites == {} and relu_at.spec.training == "fgsm"
    assert capped.capped_sites == {"4": "capped_relu(cap=0.1)"}  # the 32-unit layer only
    assert capped_at.capped_sites == capped.capped_sites and capped_at.spec.training == "fgsm"
    assert isinstance(capped.model[4], CappedReLU) and type(capped.model[2]) is torch.nn.ReLU
    assert relu_at.train_history["config"]["eps"] == 0.1
    for m in result.models:
        assert 0.0 <= m.clean <= 1.0
        assert set(m.pgd) == set(LIBRARY_PGD)
        # library PGDs, the standard suite (without its BPDA and transfer members on a model with
        # no cap: there they only repeat white-box PGD), FGSM
        suite = 8 if m.capped_sites else 4
        assert len(m.attacks) == 3 + suite + 1, (m.name, sorted(m.attacks))
        assert any("+bpda(ste)" in a for a in m.attacks) == bool(m.capped_sites)


def test_worst_case_is_at_most_every_single_attack_per_model_and_eps(tiny):
    result, out = tiny
    for m in result.models:
        stored = Results.load(os.path.join(out, "results", f"{m.spec.slug}.jsonl"))
        assert set(stored.attacks) == set(m.attacks) | {"certify:ibp"}
        assert not stored.failed() and not stored.missing()
        for eps in result.config.eps:
            worst = stored.worst_case(eps)
            assert worst == m.worst_case[eps]
            for attack in m.attacks:  # the attacks; the certify rows are the bracket's lower end
                acc = stored.robust_accuracy(attack, eps)  # audit schedule: some are conditional
                assert acc is None if stored.conditional(attack, eps) else worst <= acc
            assert stored.certified(eps) <= worst
            for lib in LIBRARY_PGD:
                assert worst <= m.pgd[lib][eps]
            assert worst <= m.clean


def test_report_folder_has_table_plots_settings_and_files(tiny):
    result, out = tiny
    for name in ("report.md", "summary.json", *PLOTS.values()):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for m in result.models:
        assert os.path.isfile(os.path.join(out, "results", f"{m.spec.slug}.jsonl"))
        net, _ = build_model(m.spec, result.config, torch.zeros(1, 1, 28, 28))
        load_checkpoint(net, os.path.join(out, "models", f"{m.spec.slug}.pt"))
        for a, b in zip(net.state_dict().values(), m.model.state_dict().values()):
            assert torch.equal(a, b)
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "| " + " | ".join(ExperimentResult.TABLE_COLUMNS) + " |" in report
    for row in result.table_rows():
        assert "| " + " | ".join(row) + " |" in report
    for png in PLOTS.values():
        assert f"]({png})" in report
    assert "our numbers" in report and "not figures from arXiv 2405.03777" in report
    for setting in ("5 steps", "1 restart(s)", "eps 0.1", "1 epoch(s)", "first 24 test digits",
                    "600 training digits", "Square (20 queries)", "seed 0"):
        assert setting in report, setting
    summary = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
    assert [m["name"] for m in summary["models"]] == MODELS
    assert summary["config"]["steps"] == 5 and summary["best"] == "cap 0.1 bottleneck"


def test_table_rows_and_printed_table(tiny, capsys):
    result, _ = tiny
    rows = result.table_rows()
    assert [r[0] for r in rows] == MODELS
    assert all(len(r) == len(ExperimentResult.TABLE_COLUMNS) for r in rows)
    for r, m in zip(rows, result.models):
        assert r[1] == f"{100 * m.clean:.1f}%"
        # the calibrated verdict (issue 14): measured with its over-report, else the level
        assert m.level in ("masking measured", "risk factors only", "no sign")
        assert (m.level == "no sign") == (not m.fired)
        if m.level == "masking measured":
            at = m.over_report["per_eps"][result.config.headline_eps]
            assert r[-1].startswith(f"measured +{100 * at['over_report']:.1f} pts [")
        else:
            assert r[-1] == m.level
    result.print()
    out = capsys.readouterr().out
    assert "worst" in out and "masking" in out and "best cap" in out
    for name in ("relu", "+FGSM"):
        assert name in out


def test_growth_compares_the_best_cap_with_its_uncapped_twin(tiny):
    result, _ = tiny
    assert result.growth_model == "cap 0.1 bottleneck"
    rows = {r["layer"]: r for r in result.growth.rows}
    assert rows["4"]["type"] == "CappedReLU"
    assert all(r["uncapped"] is not None and r["capped"] >= 0 for r in rows.values())
    # capping bounds the bottleneck's outputs: below the twin's growth after it
    assert rows["4"]["capped"] <= rows["4"]["uncapped"] + 1e-9


def test_same_seed_gives_the_identical_results_table(tiny):
    result, _ = tiny
    again = run_experiment(preset("demo", **TINY), out=None, progress=False)
    assert again.table_rows() == result.table_rows()
    assert [m.attacks for m in again.models] == [m.attacks for m in result.models]
    assert again.best == result.best and all(m.model is None for m in again.models)


def test_cli_demo_writes_the_report_and_prints_one_table(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["demo", "--caps", "1", "--n-train", "300", "--epochs", "1", "--eps", "0.1",
                 "--certified-training", "crown_ibp",
                 "--n-samples", "10", "--steps", "3", "--square-queries", "10", "--quiet",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    names = ["relu", "cap 1 all", "cap 1 bottleneck", "relu +FGSM", "cap 1 all +CROWN_IBP"]
    for name in names:
        assert name in printed
    assert "written to" in printed
    report = (out / "report.md").read_text(encoding="utf-8")
    for name in names:
        assert f"| {name} |" in report
    assert len(list((out / "results").glob("*.jsonl"))) == 6  # the grid, FGSM x2, CROWN-IBP


def test_cli_reports_bad_settings_without_a_traceback(tmp_path, capsys):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "epochs must be an int >= 1" in capsys.readouterr().err


def test_presets_demo_and_reproduce():
    demo = preset("demo")
    assert demo.caps == (0.1, 1.0, 10.0) and demo.positions == ("all", "bottleneck")
    assert demo.fgsm_best and demo.trainings == ("standard",)
    assert [s.name for s in grid(demo)] == [
        "relu", "cap 0.1 all", "cap 1 all", "cap 10 all", "cap 0.1 bottleneck", "cap 1 bottleneck",
        "cap 10 bottleneck"]
    assert preset("demo", full_grid=True).caps == PAPER_CAPS
    assert grid(preset("demo", pssilu=True))[-1].name == "pssilu"
    full = preset("reproduce")
    assert full.caps == PAPER_CAPS and full.positions == ("all", "bottleneck", "first", "last")
    assert full.trainings == ("standard", "fgsm") and not full.fgsm_best
    specs = grid(full)
    assert len(specs) == 2 * (1 + 5 * 4) and len({s.slug for s in specs}) == len(specs)
    assert full.n_samples > demo.n_samples and full.epochs > demo.epochs
    assert preset("demo", eps=(0.3,)).headline_eps == 0.3  # table eps falls back to the largest


@pytest.mark.parametrize("bad, message", [
    (dict(positions=("middle",)), "positions"),
    (dict(caps=(0.0,)), "caps must be numbers > 0"),
    (dict(trainings=("adamw",)), "trainings"),
    (dict(table_eps=0.3), "table_eps 0.3 is not one of eps"),
    (dict(no_such=1), "unknown setting"),
    (dict(data="cifar"), "data must be one of"),
])
def test_bad_configuration_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        preset("demo", **bad)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("paper")


@pytest.mark.parametrize("position, sites", [
    ("all", ["2", "4", "6"]), ("bottleneck", ["4"]), ("first", ["2"]), ("last", ["6"])])
def test_build_model_caps_the_chosen_layer_of_the_same_initial_net(position, sites):
    config = preset("demo")
    example = torch.zeros(1, 1, 28, 28)
    relu, none = build_model(ModelSpec(), config, example)
    capped, changed = build_model(ModelSpec(0.1, position), config, example)
    assert none == {} and sorted(changed) == sites
    for i in (2, 4, 6):
        assert type(capped[i]) is (CappedReLU if str(i) in sites else torch.nn.ReLU)
    for a, b in zip(relu.state_dict().values(), capped.state_dict().values()):
        assert torch.equal(a, b)  # same initial weights: only the activations differ


def test_pssilu_model_shares_one_alpha_and_beta():
    net, changed = build_model(ModelSpec(activation="pssilu"), preset("demo"), torch.zeros(1, 1, 28, 28))
    acts = [m for m in net.modules() if isinstance(m, PSSiLU)]
    assert len(changed) == 3 and len(acts) == 3
    assert all(a.alpha is acts[0].alpha and a.beta is acts[0].beta for a in acts)


def _fake(name_cap, position, worst, clean, training="standard"):
    spec = ModelSpec(name_cap, position, training)
    return ModelResult(spec, clean, {}, {0.1: worst}, {}, "", [], {}, {}, None, None, 0.0)


def test_best_cap_is_highest_worst_case_then_clean_then_earlier():
    config = preset("demo", eps=(0.1,))
    models = [_fake(math.inf, "all", 0.9, 0.99), _fake(0.1, "all", 0.3, 0.8),
              _fake(1.0, "all", 0.5, 0.9), _fake(10.0, "all", 0.5, 0.95),
              _fake(0.1, "bottleneck", 0.5, 0.95), _fake(0.01, "all", 0.99, 0.99, "fgsm")]
    assert pick_best(models, config).name == "cap 10 all"  # ReLU and other trainings excluded
    assert pick_best(models[:1], config) is None


def test_certified_trained_row_and_certified_column_bracket_the_worst_case(tiny):
    """The IBP-trained capped model is the last row; every model's certified column equals its
    stored certify rows and a direct IBP bound, and is at most its worst case at every eps."""
    from relucap_plugin.certification import certified_margins, margin_tolerance
    from relucap_plugin.data import load_mnist5k

    result, out = tiny
    cert = result.models[-1]
    assert cert.spec.training == "ibp" and cert.train_history["method"] == "ibp"
    assert set(cert.capped_sites) == {"2", "4", "6"}  # every site, cap 1
    col = ExperimentResult.TABLE_COLUMNS.index("certified")
    assert col == ExperimentResult.TABLE_COLUMNS.index("worst case") + 1
    x, y = (t[:24] for t in load_mnist5k(seed=0)[1].tensors)
    for m, row in zip(result.models, result.table_rows()):
        stored = Results.load(os.path.join(out, "results", f"{m.spec.slug}.jsonl"))
        for eps in result.config.eps:
            assert m.certified[eps] is not None
            assert 0.0 <= m.certified[eps] <= m.worst_case[eps] <= m.clean
            assert stored.certified(eps) == m.certified[eps]
            bound = certified_margins(m.model, x, y, eps, method="ibp")
            logits = m.model(x)
            proved = (bound > margin_tolerance(logits)) & (logits.argmax(1) == y)
            assert proved.float().mean().item() == pytest.approx(m.certified[eps])
        assert row[col] == f"{100 * m.certified[result.config.headline_eps]:.1f}%"
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "IBP training (Gowal et al. 2018)" in report and "method 'ibp'" in report


def test_certified_settings_are_checked():
    from relucap_plugin.experiment import ExperimentConfig, certified_spec

    assert certified_spec(ExperimentConfig(certified_training=None)) is None
    assert certified_spec(preset("demo")) == ModelSpec(1.0, "all", "ibp")
    with pytest.raises(ValueError, match="certified_training must be one of ibp, crown_ibp"):
        preset("demo", certified_training="pgd")
    with pytest.raises(ValueError, match="certify_method must be one of"):
        preset("demo", certify_method="lp")
    with pytest.raises(ValueError, match="certified_cap must be a finite number"):
        preset("demo", certified_cap=math.inf)
