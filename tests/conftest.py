"""Fixtures shared by the test files.

``mnist5k`` is the embedded (train, test) MNIST split; ``mnist_mlp`` a paper-style MLP trained on
it once per session (a few Adam epochs, eval mode, CPU). Tests that change the model must work
on ``copy.deepcopy(mnist_mlp)``.
"""

from __future__ import annotations

import os

import pytest
import torch

# subprocesses (killed runs, torchrun ranks) import this checkout's package, not an installed one
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per xdist worker: `pytest -n 2` on 2 cores without oversubscription
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist5k():
    from relucap_plugin.data import load_mnist5k

    return load_mnist5k(n_test=1000, seed=0)


@pytest.fixture(scope="session")
def mnist_mlp(mnist5k):
    from relucap_plugin.models import mlp
    from relucap_plugin.training import train

    train_set, _ = mnist5k
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp()
    train(model, train_set, "standard", epochs=3, lr=1e-3, batch_size=64, seed=0, device="cpu", progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def capped_mlp(mnist5k):
    """The MLP of ``mnist_mlp`` with CappedReLU(0.1) on its 32-unit bottleneck only (5 epochs):
    the gradient-masking case of issue 5."""
    from relucap_plugin.activations import CappedReLU
    from relucap_plugin.models import mlp
    from relucap_plugin.training import train

    train_set, _ = mnist5k
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp()
    model[4] = CappedReLU(0.1)
    train(model, train_set, "standard", epochs=5, lr=1e-3, batch_size=64, seed=0, device="cpu", progress=False)
    return model.eval()
