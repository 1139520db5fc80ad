"""Training methods, determinism, learnable caps, checkpoints and bad input for training.py."""

import copy
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from relucap_plugin.models import mlp
from relucap_plugin.training import (
    TRAIN_METHODS,
    _adversarial,
    accuracy,
    load_checkpoint,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def mnist(mnist5k):
    return mnist5k


@pytest.fixture(scope="module")
def small(mnist):
    x, y = mnist[0].tensors
    return x[:256], y[:256]


@pytest.fixture(scope="module")
def standard_model(mnist):
    torch.manual_seed(0)
    model = mlp()
    history = train(model, mnist[0], epochs=5, seed=0, progress=False)
    return model, history


def _fgsm_accuracy(model, data, eps):
    import torchattacks

    x, y = data.tensors
    x_adv = torchattacks.FGSM(model, eps=eps)(x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_standard_training_reaches_91_percent_and_leaves_eval_mode(standard_model, mnist):
    model, history = standard_model
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert accuracy(model, mnist[1]) >= 0.91  # measured 0.918-0.930 over seeds 0-5
    assert len(history.loss) == len(history.accuracy) == 5
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert history.accuracy[-1] > 0.9
    assert history.config["lr"] == 1e-3 and history.config["batch_size"] == 64
    assert history.config["device"] == "cpu" and history.seconds > 0


def test_fgsm_training_is_more_robust_to_fgsm_than_standard(standard_model, mnist):
    torch.manual_seed(0)
    robust = mlp()
    history = train(robust, mnist[0], "fgsm", epochs=3, eps=0.1, seed=0, progress=False)
    assert history.config["clean_weight"] == 0.5 and history.config["alpha"] == 0.1
    standard_acc = _fgsm_accuracy(standard_model[0], mnist[1], 0.1)
    robust_acc = _fgsm_accuracy(robust, mnist[1], 0.1)
    # measured over seeds 0-3: standard 0.10-0.14, FGSM-trained 0.62-0.66 (clean 0.87-0.91)
    assert robust_acc >= standard_acc + 0.35
    assert accuracy(robust, mnist[1]) >= 0.85


def test_training_fgsm_step_matches_torchattacks_fgsm(standard_model, mnist):
    import torchattacks

    model = standard_model[0]
    x, y = mnist[1].tensors[0][:200], mnist[1].tensors[1][:200]
    ours = _adversarial(model, x, y, 0.1, 0.1, 1, False, (0.0, 1.0), None)
    theirs = torchattacks.FGSM(model, eps=0.1)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not model.training


def test_training_pgd_examples_stay_in_ball_and_bounds_and_beat_fgsm(standard_model, mnist):
    model = standard_model[0]
    x, y = mnist[1].tensors[0][:200], mnist[1].tensors[1][:200]
    gen = torch.Generator().manual_seed(0)
    pgd = _adversarial(model, x, y, 0.1, 0.025, 10, True, (0.0, 1.0), gen)
    fgsm = _adversarial(model, x, y, 0.1, 0.1, 1, False, (0.0, 1.0), None)
    assert (pgd - x).abs().max() <= 0.1 + 1e-6
    assert pgd.min() >= 0 and pgd.max() <= 1
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(model(v), y).item() for v in (x, fgsm, pgd)]
    assert losses[0] < losses[1] < losses[2]
    for p in model.parameters():
        assert p.grad is None


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_every_method_trains_and_resolves_its_step(method, small):
    torch.manual_seed(0)
    model = mlp(widths=(32,))
    before = _state(model)
    history = train(model, small, method, epochs=2, eps=0.2, pgd_steps=4, progress=False)
    cfg = history.config
    expected_alpha = {"standard": None, "fgsm": 0.2, "fgsm_rs": 0.25, "pgd": 0.125, "ibp": None,
                      "crown_ibp": None}[method]
    assert cfg["alpha"] == pytest.approx(expected_alpha) if expected_alpha else cfg["alpha"] is None
    assert cfg["random_start"] == (method in ("fgsm_rs", "pgd"))
    assert cfg["steps"] == {"standard": None, "fgsm": 1, "fgsm_rs": 1, "pgd": 4, "ibp": None,
                            "crown_ibp": None}[method]
    assert len(history.loss) == 2 and all(0 < v < 10 for v in history.loss)
    assert not _same_state(before, model.state_dict())
    assert not model.training


@pytest.mark.parametrize("method", ["standard", "pgd"])
def test_same_seed_gives_bit_identical_weights(method, small):
    def run(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.5),
                              nn.Linear(32, 10))
        rng_before = torch.get_rng_state()
        train(model, small, method, epochs=2, pgd_steps=2, seed=seed, progress=False)
        assert torch.equal(torch.get_rng_state(), rng_before)  # seeded training leaves it alone
        return model.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert _same_state(first, second)
    assert not _same_state(first, other)


def test_pair_dataset_and_loader_inputs(small):
    x, y = small
    results = []
    for data in [(x, y), TensorDataset(x, y)]:
        torch.manual_seed(0)
        model = mlp(widths=(16,))
        train(model, data, epochs=1, seed=3, progress=False)
        results.append(model.state_dict())
    assert _same_state(*results)
    torch.manual_seed(0)
    model = mlp(widths=(16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    history = train(model, loader, epochs=1, progress=False)
    assert history.loss[0] > 0 and accuracy(model, loader) > 0.3


def test_learnable_cap_moves_during_training(small):
    torch.manual_seed(0)
    model = mlp(widths=(64, 16), activation="learnable_capped_relu(cap=1.0)")
    caps = [m for m in model.modules() if type(m).__name__ == "LearnableCappedReLU"]
    train(model, small, epochs=2, lr=1e-2, batch_size=16, progress=False)
    moved = [c.cap.item() - 1.0 for c in caps]
    assert len(caps) == 2
    assert all(abs(m) > 0.05 for m in moved)  # measured 0.10-0.19 over seeds 0-3


def test_weight_decay_shrinks_weights(small):
    norms = []
    for wd in (0.0, 0.1):
        torch.manual_seed(0)
        model = mlp(widths=(32,))
        train(model, small, epochs=2, optimizer="sgd", lr=0.05, weight_decay=wd, progress=False)
        norms.append(model[1].weight.norm().item())
        assert model[1].weight.norm().item() > 0
    assert norms[1] < 0.9 * norms[0]


def test_train_works_under_callers_no_grad_and_restores_mode_on_error(small):
    torch.manual_seed(0)
    model = mlp(widths=(16,))
    with torch.no_grad():
        train(model, small, "fgsm_rs", epochs=1, progress=False)
    assert not model.training
    bad = mlp(widths=(16,), in_shape=(1, 8, 8))
    bad.eval()
    with pytest.raises(ValueError, match=r"train: data \(training batch 0 .* does not run through"):
        train(bad, small, epochs=1, progress=False)
    assert not bad.training


def test_accuracy_keeps_mode_and_matches_argmax(standard_model, mnist):
    model = copy.deepcopy(standard_model[0]).train()
    x, y = mnist[1].tensors
    expected = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy(model, mnist[1], batch_size=97) == pytest.approx(expected)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"method": "trades"}, ValueError, "standard, fgsm, fgsm_rs, pgd"),
        ({"optimizer": "lbfgs"}, ValueError, "'adam' or 'sgd'"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 2.5}, ValueError, "batch_size"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"method": "fgsm", "eps": 0}, ValueError, "eps"),
        ({"method": "pgd", "pgd_steps": 0}, ValueError, "pgd_steps"),
        ({"method": "fgsm", "clean_weight": 1.5}, ValueError, "clean_weight"),
        ({"bounds": (1, 0)}, ValueError, "low < high"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"checkpoint": "/no/such/folder/w.pt"}, FileNotFoundError, "create it"),
    ],
)
def test_bad_arguments_raise_before_touching_the_model(kwargs, error, words, small):
    torch.manual_seed(0)
    model = mlp(widths=(16,)).train()
    before = _state(model)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(model, small, **{"progress": False, **kwargs})
    assert _same_state(before, model.state_dict()) and model.training


def test_bad_model_and_data_raise_clear_errors(small):
    with pytest.raises(TypeError, match="nn.Module"):
        train(lambda x: x, small, progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(nn.Flatten(), small, progress=False)
    with pytest.raises(TypeError, match=r"\(x, y\) pair"):
        train(mlp(widths=(8,)), "mnist", progress=False)
    with pytest.raises(ValueError, match="normalise inside the model"):
        train(mlp(widths=(8,)), (small[0] * 2 - 1, small[1]), "fgsm", progress=False)
    with pytest.raises(ValueError, match="seed"):
        train(mlp(widths=(8,)), small, seed=-1, progress=False)
    with pytest.raises(TypeError, match="x.float\\(\\) / 255"):
        train(mlp(widths=(8,)), ((small[0] * 255).to(torch.uint8), small[1]), progress=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(suffix, tmp_path, small):
    torch.manual_seed(0)
    model = mlp(widths=(32, 8), activation="learnable_capped_relu(cap=2.0)")
    path = tmp_path / f"weights{suffix}"
    train(model, small, epochs=1, progress=False, checkpoint=path)
    torch.manual_seed(1)
    fresh = mlp(widths=(32, 8), activation="learnable_capped_relu(cap=2.0)")
    assert not _same_state(fresh.state_dict(), model.state_dict())
    assert load_checkpoint(fresh, path) is fresh
    assert _same_state(fresh.state_dict(), model.state_dict())
    assert save_checkpoint(model, tmp_path / f"again{suffix}") == str(tmp_path / f"again{suffix}")
    if suffix == ".pt":
        state = torch.load(path, weights_only=True)
        assert set(state) == set(model.state_dict())
    else:
        from safetensors.torch import load_file

        assert set(load_file(str(path))) == set(model.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_mismatch_names_keys_and_leaves_model_unchanged(suffix, tmp_path):
    path = tmp_path / f"w{suffix}"
    save_checkpoint(mlp(widths=(32, 8)), path)
    deeper = mlp(widths=(32, 8, 8))
    before = _state(deeper)
    with pytest.raises(ValueError) as info:
        load_checkpoint(deeper, path)
    message = str(info.value)
    assert "missing keys: 7.bias, 7.weight;" in message and "unexpected keys" not in message
    assert "shape mismatches: 5.bias: checkpoint (10,) vs model (8,), 5.weight" in message
    assert "same architecture" in message
    assert _same_state(before, deeper.state_dict())
    with pytest.raises(ValueError, match="unexpected keys: 5.bias, 5.weight"):
        load_checkpoint(mlp(widths=(32,)), path)


def test_checkpoint_bad_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(mlp(widths=(8,)), tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only torch state dict"):
        load_checkpoint(mlp(widths=(8,)), junk)
    torch.save({"w": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_checkpoint(mlp(widths=(8,)), tmp_path / "list.pt")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_checkpoint(mlp(widths=(8,)), tmp_path / "w.safetensors")


@pytest.mark.parametrize("steps, alpha, random_start", [(1, 0.1, False), (1, 0.125, True), (5, 0.05, True)])
def test_training_pgd_is_torch_pgd_bit_for_bit_for_the_same_seed(steps, alpha, random_start):
    """Adversarial training (fgsm, fgsm_rs, pgd) and ``torch:PGD`` run one L-inf PGD loop: the
    same inputs, random starts and settings give the identical adversarial batch. ``torch:PGD``
    draws each sample's start from its own generator (seed, sample id); training draws the
    batch's from one generator, so the test hands the loop torch:PGD's per-sample generators."""
    from relucap_plugin import ThreatModel, get_attack
    from relucap_plugin._torch import sample_seed

    torch.manual_seed(0)
    model = mlp((32,)).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    seed = 7
    generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(len(x))]
    ours = _adversarial(model, x, y, 0.1, alpha, steps, random_start, (0.0, 1.0), generators)
    tm = ThreatModel("Linf", eps=0.1, steps=steps, step_size=alpha, random_start=random_start)
    theirs = get_attack("torch:PGD", tm)(model, x, y, seed=seed)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, x) and (ours - x).abs().max() <= 0.1 + 1e-6
    if random_start:  # another seed, another start
        other = _adversarial(model, x, y, 0.1, alpha, steps, True, (0.0, 1.0),
                             torch.Generator().manual_seed(seed + 1))
        assert not torch.equal(ours, other)


@pytest.mark.parametrize("method", ["fgsm", "fgsm_rs", "pgd", "ibp"])
def test_an_eps_wider_than_the_input_range_is_refused_before_training(method):
    """train(..., eps=8) meant 8/255: every input is in the ball, yet it trained without a word
    (evaluate and attacks already refused the same budget)."""
    model = mlp((8,), in_shape=(1, 4, 4))
    before = copy.deepcopy(model.state_dict())
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match=r"Linf eps 8.0 exceeds the input range 1.0 .*8/255"):
        train(model, (x, y), method, eps=8, epochs=1, progress=False, device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    train(model, (x * 255, y), "pgd", eps=8, bounds=(0, 255), epochs=1, progress=False, device="cpu")


def test_a_model_normalising_on_batch_statistics_in_eval_mode_trains_and_is_scored():
    """BatchNorm1d(track_running_stats=False) normalises on the batch in eval mode too, so
    one sample cannot run: the first-batch check tries two instead of refusing the data."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8, track_running_stats=False),
                        nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    history = train(net, (x, y), epochs=1, batch_size=32)
    assert len(history.loss) == 1
    net.eval()
    with torch.no_grad():
        expected = float((net(x).argmax(1) == y).float().mean())
    assert accuracy(net, (x, y), batch_size=64) == pytest.approx(expected)
