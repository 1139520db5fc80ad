"""Every error a user can provoke names what they passed: the argument (or CLI flag) and its value.

Table-driven through the public API (``relucap_plugin.<name>``) and the CLI (``relucap ...``),
never through private helpers. Each case asserts the exception type and that the message holds
the argument's name and the offending value as the user wrote it (tensors by dtype and shape);
most also carry the fix. Issue 12: "every error raised in the package names what the user passed".
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import relucap_plugin as r
from relucap_plugin.cli import main

TM = r.ThreatModel("Linf", eps=0.1, steps=2)


@pytest.fixture(scope="module")
def kit():
    """A tiny classifier (3 classes on 1x4x4 inputs), six samples and labels."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = r.mlp((8,), in_shape=(1, 4, 4), num_classes=3)
        x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    return model, x, y


def fgsm():
    return r.get_attack("torch:FGSM", TM)


# (id, call(model, x, y, tmp_path), exception type, substrings the message must hold)
API_CASES = [
    # activations and registry
    ("CappedReLU-cap-str", lambda m, x, y, t: r.CappedReLU("big"), TypeError, ["cap", "'big'"]),
    ("CappedReLU-cap-negative", lambda m, x, y, t: r.CappedReLU(-1.0), ValueError, ["cap", "-1"]),
    ("capped_relu-x-list", lambda m, x, y, t: r.capped_relu([1, 2], 1.0), TypeError,
     ["x must be a torch.Tensor", "[1, 2]", "torch.as_tensor"]),
    ("DynamicCappedReLU-quantile", lambda m, x, y, t: r.DynamicCappedReLU(quantile=2.0), ValueError,
     ["quantile", "2.0"]),
    ("LearnableCappedReLU-cap-inf", lambda m, x, y, t: r.LearnableCappedReLU(cap=math.inf), ValueError,
     ["cap=inf", "cap=6.0"]),
    ("LearnableCappedReLU-num_channels", lambda m, x, y, t: r.LearnableCappedReLU(num_channels=0), ValueError,
     ["num_channels", "0"]),
    ("PSiLU-unknown-parameter", lambda m, x, y, t: r.PSiLU(foo=1.0), TypeError, ["'foo'", "alpha"]),
    ("SpatialAttentionReLU-kernel_size", lambda m, x, y, t: r.SpatialAttentionReLU(kernel_size=4), ValueError,
     ["kernel_size", "4"]),
    ("share_parameters-int", lambda m, x, y, t: r.share_parameters(3), TypeError, ["modules", "int 3"]),
    ("create_activation-unknown", lambda m, x, y, t: r.create_activation("nosuch"), ValueError,
     ["'nosuch'", "registered"]),
    ("create_activation-module-and-args", lambda m, x, y, t: r.create_activation(nn.ReLU(), 1.0), TypeError,
     ["spec is the module ReLU", "args=(1.0,)"]),
    ("create_activation-int", lambda m, x, y, t: r.create_activation(5), TypeError, ["activation spec", "int 5"]),
    ("parse_spec-syntax", lambda m, x, y, t: r.parse_spec("capped_relu(cap=)"), ValueError,
     ["'capped_relu(cap=)'", "name(key=value"]),
    ("register_activation-not-callable", lambda m, x, y, t: r.register_activation("zz_msgs", 5), TypeError,
     ["'zz_msgs'", "got 5"]),
    # threat model and config
    ("ThreatModel-norm", lambda m, x, y, t: r.ThreatModel("L3", eps=0.1), ValueError, ["norm", "'L3'", "Linf"]),
    ("ThreatModel-eps-negative", lambda m, x, y, t: r.ThreatModel("Linf", eps=-0.1), ValueError, ["eps", "-0.1"]),
    ("ThreatModel-eps-str", lambda m, x, y, t: r.ThreatModel("Linf", eps="a"), TypeError, ["eps", "'a'"]),
    ("ThreatModel-bounds", lambda m, x, y, t: r.ThreatModel("Linf", eps=0.1, bounds=(1, 0)), ValueError,
     ["bounds", "(1, 0)"]),
    ("ThreatModel-steps", lambda m, x, y, t: r.ThreatModel("Linf", eps=0.1, steps=0), ValueError, ["steps", "0"]),
    ("ThreatModel-steps-ceiling", lambda m, x, y, t: r.ThreatModel("Linf", eps=0.1, steps=10**8), ValueError,
     ["steps=100000000", "RELUCAP_ALLOW_LARGE_BUDGET"]),
    ("ThreatModel-loss", lambda m, x, y, t: r.ThreatModel("Linf", eps=0.1, loss="hinge"), ValueError,
     ["loss", "'hinge'"]),
    ("ThreatModel-targeted", lambda m, x, y, t: r.ThreatModel("Linf", eps=0.1, targeted="yes"), TypeError,
     ["targeted", "'yes'"]),
    ("ThreatModel-step_size", lambda m, x, y, t: r.ThreatModel("Linf", eps=0.1, step_size=-1), ValueError,
     ["step_size", "-1"]),
    ("EvalConfig-batch_size", lambda m, x, y, t: r.EvalConfig(batch_size=0), ValueError, ["batch_size", "0"]),
    ("EvalConfig-device", lambda m, x, y, t: r.EvalConfig(device="tpu"), ValueError, ["device", "'tpu'"]),
    ("EvalConfig-seed", lambda m, x, y, t: r.EvalConfig(seed=1.5), TypeError, ["seed", "1.5"]),
    ("EvalConfig-n_samples", lambda m, x, y, t: r.EvalConfig(n_samples=0), ValueError, ["n_samples", "0"]),
    ("EvalConfig-input_shape", lambda m, x, y, t: r.EvalConfig(input_shape=(0, 2)), ValueError,
     ["input_shape", "(0, 2)"]),
    # attacks
    ("get_attack-unknown-name", lambda m, x, y, t: r.get_attack("torch:NoSuch", TM), ValueError,
     ["'NoSuch'", "FGSM"]),
    ("get_attack-unknown-library", lambda m, x, y, t: r.get_attack("zzz:PGD", TM), ValueError,
     ["attack spec 'zzz:PGD'", "'zzz'", "torchattacks"]),
    ("get_attack-threat_model-dict", lambda m, x, y, t: r.get_attack("torch:PGD", {"eps": 0.1}), TypeError,
     ["threat_model", "{'eps': 0.1}"]),
    ("get_attack-spec-sets-eps", lambda m, x, y, t: r.get_attack("torch:PGD(eps=0.3)", TM), ValueError,
     ["eps=0.3", "ThreatModel"]),
    ("get_attack-unknown-override", lambda m, x, y, t: r.get_attack("torch:PGD", TM, foo=1), ValueError,
     ["torch:PGD", "foo"]),
    ("get_attack-batch_size", lambda m, x, y, t: r.get_attack("torch:PGD", TM, batch_size=0), ValueError,
     ["batch_size", "0"]),
    ("get_attack-overrides-on-instance", lambda m, x, y, t: r.get_attack(fgsm(), TM, steps=3), TypeError,
     ["['steps']", "torch:FGSM"]),
    ("parse_attack-no-library", lambda m, x, y, t: r.parse_attack("PGD(("), ValueError, ["'PGD(('", "library:Name"]),
    ("make_attack-not-callable", lambda m, x, y, t: r.make_attack(5), TypeError, ["fn(model, x, y, eps)", "got 5"]),
    ("attack-call-model-str", lambda m, x, y, t: fgsm()("notamodel", x, y), TypeError,
     ["model must be a torch.nn.Module", "'notamodel'"]),
    ("attack-call-x-numpy", lambda m, x, y, t: fgsm()(m, x.numpy(), y), TypeError,
     ["x must be a torch.Tensor", "ndarray(dtype=float32, shape=(6, 1, 4, 4))"]),
    ("attack-call-eps-negative", lambda m, x, y, t: fgsm()(m, x, y, eps=-1), ValueError, ["eps", "-1"]),
    ("attack-call-labels-out-of-range", lambda m, x, y, t: fgsm()(m, x, torch.full((6,), 7)), ValueError,
     ["labels must be in [0, 2]", "y holds labels in [7, 7]"]),
    ("attack-call-y-shape", lambda m, x, y, t: fgsm()(m, x, y[:3]), ValueError, ["y must be", "(3,)"]),
    ("attack-call-x-out-of-bounds", lambda m, x, y, t: fgsm()(m, x + 2, y), ValueError,
     ["x has values in [2.", "bounds (0.0, 1.0)"]),
    # evaluate (argument checks: nothing is attacked)
    ("evaluate-model-str", lambda m, x, y, t: r.evaluate("m", (x, y), "torch:FGSM", TM), TypeError,
     ["model must be a torch.nn.Module", "str 'm'"]),
    ("evaluate-data-int", lambda m, x, y, t: r.evaluate(m, 5, "torch:FGSM", TM), TypeError,
     ["cannot use int as data", "got 5"]),
    ("evaluate-data-triple", lambda m, x, y, t: r.evaluate(m, (x, y, y), "torch:FGSM", TM), ValueError,
     ["got 3", "Tensor(dtype=torch.float32, shape=(6, 1, 4, 4))"]),
    ("evaluate-attacks-int", lambda m, x, y, t: r.evaluate(m, (x, y), 5, TM), ValueError, ["attacks", "int 5"]),
    ("evaluate-attacks-empty", lambda m, x, y, t: r.evaluate(m, (x, y), [], TM), ValueError, ["attacks", "list []"]),
    ("evaluate-attack-object", lambda m, x, y, t: r.evaluate(m, (x, y), [object()], TM), TypeError,
     ["as an attack", "object object"]),
    ("evaluate-threat_model-float", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", 0.1), TypeError,
     ["threat_model", "float 0.1"]),
    ("evaluate-threat_model-dict-typo", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", {"norm": "Linf",
                                                                                               "epz": 0.1}),
     ValueError, ["ThreatModel field", "'epz'"]),
    ("evaluate-config-int", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM, config=5), TypeError,
     ["config", "int 5"]),
    ("evaluate-resume", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM, resume="yes"), TypeError,
     ["resume", "'yes'"]),
    ("evaluate-output", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM, output=1.5), TypeError,
     ["output", "1.5"]),
    ("evaluate-keep_adversarial", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM,
                                                                 keep_adversarial="best"),
     ValueError, ["keep_adversarial", "'best'"]),
    ("evaluate-notes-int", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM, notes=5), TypeError,
     ["notes", "got 5"]),
    ("evaluate-model_name-int", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM, model_name=5), TypeError,
     ["model_name", "int 5"]),
    ("evaluate-out-missing-folder", lambda m, x, y, t: r.evaluate(m, (x, y), "torch:FGSM", TM, progress=False,
                                                                   out=str(t / "no" / "r.jsonl")),
     FileNotFoundError, ["out=", "r.jsonl", "create it first"]),
    ("evaluate-float-labels", lambda m, x, y, t: r.evaluate(m, (x, y.float()), "torch:FGSM", TM, progress=False),
     TypeError, ["y must be", "torch.float32"]),
    ("evaluate-labels-out-of-range", lambda m, x, y, t: r.evaluate(m, (x, y + 7), "torch:FGSM", TM,
                                                                    progress=False),
     ValueError, ["labels must be in [0, 2]", "labels in [7,"]),
    ("evaluate-x-y-lengths", lambda m, x, y, t: r.evaluate(m, (x, y[:3]), "torch:FGSM", TM, progress=False),
     ValueError, ["x (6, 1, 4, 4)", "y (3,)"]),
    # training and checkpoints
    ("train-model-str", lambda m, x, y, t: r.train("m", (x, y)), TypeError, ["train", "str 'm'"]),
    ("train-method", lambda m, x, y, t: r.train(m, (x, y), method="magic"), ValueError, ["method", "'magic'"]),
    ("train-optimizer", lambda m, x, y, t: r.train(m, (x, y), optimizer="lbfgs"), ValueError,
     ["optimizer", "'lbfgs'"]),
    ("train-lr", lambda m, x, y, t: r.train(m, (x, y), lr=-1), ValueError, ["lr", "-1"]),
    ("train-epochs", lambda m, x, y, t: r.train(m, (x, y), epochs=0), ValueError, ["epochs", "0"]),
    ("train-bounds", lambda m, x, y, t: r.train(m, (x, y), bounds=(1, 0)), ValueError, ["bounds", "(1, 0)"]),
    ("train-clean_weight", lambda m, x, y, t: r.train(m, (x, y), clean_weight=2), ValueError,
     ["clean_weight", "2"]),
    ("train-schedule-key", lambda m, x, y, t: r.train(m, (x, y), method="ibp", schedule={"kappa": 1}), ValueError,
     ["schedule", "'kappa'"]),
    ("train-checkpoint-int", lambda m, x, y, t: r.train(m, (x, y), checkpoint=5), TypeError,
     ["checkpoint path", "int 5"]),
    ("train-device", lambda m, x, y, t: r.train(m, (x, y), device="gpu9"), ValueError, ["device", "'gpu9'"]),
    ("accuracy-device", lambda m, x, y, t: r.accuracy(m, (x, y), device="tpu"), ValueError, ["device", "'tpu'"]),
    ("accuracy-batch_size", lambda m, x, y, t: r.accuracy(m, (x, y), batch_size=0), ValueError,
     ["batch_size", "0"]),
    ("accuracy-labels-out-of-range", lambda m, x, y, t: r.accuracy(m, (x, torch.full((6,), 5))), ValueError,
     ["labels must be in [0, 2]", "labels in [5, 5]"]),
    ("load_checkpoint-folder", lambda m, x, y, t: r.load_checkpoint(m, t), ValueError,
     ["checkpoint '", "is a folder"]),
    ("load_checkpoint-device-node", lambda m, x, y, t: r.load_checkpoint(m, "/dev/null"), ValueError,
     ["checkpoint '/dev/null'", "not a regular file"]),
    ("load_checkpoint-missing", lambda m, x, y, t: r.load_checkpoint(m, t / "none.pt"), FileNotFoundError,
     ["checkpoint", "none.pt"]),
    ("load_checkpoint-text-file", lambda m, x, y, t: r.load_checkpoint(m, _text(t)), ValueError,
     ["checkpoint", "notes.txt", "save_checkpoint"]),
    ("save_checkpoint-model-str", lambda m, x, y, t: r.save_checkpoint("m", t / "m.pt"), TypeError,
     ["save_checkpoint", "str 'm'"]),
    ("save_checkpoint-folder", lambda m, x, y, t: r.save_checkpoint(m, t), ValueError,
     ["checkpoint '", "is a folder"]),
    # data and models
    ("as_tensors-limit", lambda m, x, y, t: r.as_tensors((x, y), limit=0), ValueError, ["limit", "0"]),
    ("as_tensors-str", lambda m, x, y, t: r.as_tensors("data"), TypeError, ["cannot use str as data", "'data'"]),
    ("as_loader-batch_size", lambda m, x, y, t: r.as_loader((x, y), batch_size=0), ValueError, ["batch_size", "0"]),
    ("evaluate-x-nested-list", lambda m, x, y, t: r.evaluate(m, ([[1.0]], y[:1]), "torch:FGSM", TM), TypeError,
     ["x must be a torch tensor or numpy array", "list [[1.0]]"]),
    ("accuracy-dataset-without-labels", lambda m, x, y, t: r.accuracy(m, _Unlabelled(x)), TypeError,
     ["(x, y) pairs", "Tensor(dtype=torch.float32, shape=(6, 1, 4, 4))"]),
    ("as_dataset-list-of-three", lambda m, x, y, t: r.as_dataset([1, 2, 3]), ValueError, ["got 3", "[1, 2, 3]"]),
    ("load_mnist-missing", lambda m, x, y, t: r.load_mnist(t / "nomnist"), FileNotFoundError,
     ["nomnist", "train-images-idx3-ubyte"]),
    ("load_cifar10-missing", lambda m, x, y, t: r.load_cifar10(t / "nocifar"), FileNotFoundError,
     ["nocifar", "data_batch_1"]),
    ("load_mnist-root-is-a-file", lambda m, x, y, t: r.load_mnist(_text(t)), NotADirectoryError,
     ["load_mnist: root", "notes.txt", "is a file, not a folder"]),
    ("load_cifar10-root-is-a-file", lambda m, x, y, t: r.load_cifar10(_text(t)), NotADirectoryError,
     ["load_cifar10: root", "notes.txt", "cifar-10-batches-py"]),
    ("load_mnist-root-int", lambda m, x, y, t: r.load_mnist(5), TypeError, ["root", "int 5"]),
    ("load_mnist-corrupt-gzip", lambda m, x, y, t: r.load_mnist(_not_gzip(t)), ValueError,
     ["train-images-idx3-ubyte.gz", "cannot be read as an IDX file", "BadGzipFile"]),
    ("load_mnist5k-seed-str", lambda m, x, y, t: r.load_mnist5k(seed="a"), TypeError, ["seed", "str 'a'"]),
    ("load_digits_dataset-n_test-float", lambda m, x, y, t: r.load_digits_dataset(n_test=100.5), ValueError,
     ["n_test", "100.5"]),
    ("as_loader-seed-str", lambda m, x, y, t: r.as_loader((x, y), seed="a"), TypeError, ["seed", "str 'a'"]),
    ("as_loader-shuffle-str", lambda m, x, y, t: r.as_loader((x, y), shuffle="no"), TypeError,
     ["shuffle", "str 'no'"]),
    ("scale_init-model-str", lambda m, x, y, t: r.scale_init("m", 2.0), TypeError, ["scale_init", "str 'm'"]),
    ("train-data-wrong-shape", lambda m, x, y, t: r.train(m, (torch.rand(6, 3, 8, 8), y)), ValueError,
     ["train: data (training batch 0", "shape (6, 3, 8, 8)", "torch.randn(1, 16)"]),
    ("accuracy-data-wrong-shape", lambda m, x, y, t: r.accuracy(m, (torch.rand(6, 3, 8, 8), y)), ValueError,
     ["accuracy: data (batch 0)", "shape (6, 3, 8, 8)", "torch.randn(1, 16)"]),
    ("perturbation_growth-nan", lambda m, x, y, t: r.perturbation_growth(m, x, x * math.nan), ValueError,
     ["perturbation_growth: x_adv", "NaN/inf"]),
    ("clopper_pearson-alpha", lambda m, x, y, t: r.significance.clopper_pearson(1, 5, 2.0), ValueError,
     ["alpha", "2.0", "(0, 1)"]),
    ("clopper_pearson-k-float", lambda m, x, y, t: r.significance.clopper_pearson(1.5, 5), TypeError,
     ["k must be an int", "1.5"]),
    ("mcnemar_exact-b-float", lambda m, x, y, t: r.significance.mcnemar_exact(1.5, 3), TypeError,
     ["b must be an int", "1.5"]),
    ("load_mnist5k-n_test", lambda m, x, y, t: r.load_mnist5k(n_test=-5), ValueError, ["n_test", "-5"]),
    ("mlp-widths-zero", lambda m, x, y, t: r.mlp(widths=(0,)), ValueError, ["widths", "(0,)"]),
    ("mlp-widths-str", lambda m, x, y, t: r.mlp(widths="abc"), ValueError, ["widths", "'abc'"]),
    ("mlp-activation", lambda m, x, y, t: r.mlp(activation="nosuch"), ValueError, ["activation='nosuch'"]),
    ("mlp-activation-instance", lambda m, x, y, t: r.mlp(activation=nn.ReLU()), TypeError,
     ["activation=ReLU()", "module instance"]),
    ("mlp-num_classes", lambda m, x, y, t: r.mlp(num_classes=0), ValueError, ["num_classes", "0"]),
    ("mlp-init_scale", lambda m, x, y, t: r.mlp(init_scale=-1), ValueError, ["init_scale", "-1"]),
    ("small_cnn-in_shape", lambda m, x, y, t: r.small_cnn(in_shape=(28, 28)), ValueError, ["in_shape", "(28, 28)"]),
    ("small_cnn-hidden", lambda m, x, y, t: r.small_cnn(hidden=-1), ValueError, ["hidden", "-1"]),
    ("scale_init-nan", lambda m, x, y, t: r.scale_init(m, math.nan), ValueError, ["init_scale", "nan"]),
    # surgery (argument checks; example_input shapes are issue 13's)
    ("cap_relus-model-str", lambda m, x, y, t: r.cap_relus("m", 0.1), TypeError, ["cap_relus", "str 'm'"]),
    ("cap_relus-cap-negative", lambda m, x, y, t: r.cap_relus(m, -1.0), ValueError, ["cap", "-1"]),
    ("cap_relus-cap-object", lambda m, x, y, t: r.cap_relus(m, object()), TypeError, ["cap", "object object"]),
    ("cap_relus-sites-pattern", lambda m, x, y, t: r.cap_relus(m, 0.1, sites=["nosuch*"]), ValueError,
     ["site pattern 'nosuch*'", "available sites"]),
    ("cap_relus-sites-index", lambda m, x, y, t: r.cap_relus(m, 0.1, sites=[99]), ValueError,
     ["site index 99", "1 sites"]),
    ("cap_relus-sites-float", lambda m, x, y, t: r.cap_relus(m, 0.1, sites=1.5), TypeError, ["sites", "1.5"]),
    ("cap_relus-mode", lambda m, x, y, t: r.cap_relus(m, 0.1, mode="magic"), ValueError, ["mode", "'magic'"]),
    ("cap_relus-inplace", lambda m, x, y, t: r.cap_relus(m, 0.1, inplace="yes"), TypeError, ["inplace", "'yes'"]),
    ("cap_relus-mapping-key", lambda m, x, y, t: r.cap_relus(m, {"zzz": 0.1}), ValueError, ["'zzz'", "no site"]),
    ("cap_relus-cap-unknown-spec", lambda m, x, y, t: r.cap_relus(m, "big"), ValueError,
     ["cap='big'", "unknown activation 'big'", "a number (math.inf = plain ReLU)", "per-channel"]),
    ("cap_relus-cap-nan", lambda m, x, y, t: r.cap_relus(m, math.nan), ValueError, ["cap is NaN", "positive float"]),
    ("cap_relus-cap-tensor-2d", lambda m, x, y, t: r.cap_relus(m, torch.ones(2, 2)), ValueError,
     ["cap tensor", "(2, 2)", "1-D"]),
    ("cap_relus-mapping-value-spec", lambda m, x, y, t: r.cap_relus(m, {"*": "nosuch"}), ValueError,
     ["cap['*']='nosuch'", "unknown activation"]),
    ("cap_relus-cap-wrong-length", lambda m, x, y, t: r.cap_relus(_conv(), [1.0, 2.0], example_input=x), ValueError,
     ["cap=[1.0, 2.0]", "per-channel cap of 2 entries", "one cap per channel (4)"]),
    ("CappedReLU-cap-wrong-length", lambda m, x, y, t: r.CappedReLU([1.0, 2.0])(x), ValueError,
     ["cap=[1.0, 2.0]", "shape [6, 1, 4, 4]", "one entry per channel"]),
    ("find_relus-model-int", lambda m, x, y, t: r.find_relus(5), TypeError, ["find_relus", "int 5"]),
    ("calibrate_caps-quantile", lambda m, x, y, t: r.calibrate_caps(m, x, quantile=2), ValueError,
     ["quantile", "2"]),
    ("calibrate_caps-uint8", lambda m, x, y, t: r.calibrate_caps(m, (x * 255).to(torch.uint8)), TypeError,
     ["data", "torch.uint8", "x.float() / 255"]),
    ("calibrate_caps-data-int", lambda m, x, y, t: r.calibrate_caps(m, 5), TypeError, ["data", "int 5"]),
    ("uncap-int", lambda m, x, y, t: r.uncap(5), TypeError, ["uncap", "int 5"]),
    # adaptive attacks, audit, certify, growth
    ("audit-threat_model-float", lambda m, x, y, t: r.audit(m, (x, y), 0.1), TypeError, ["threat_model", "float 0.1"]),
    ("audit-results-int", lambda m, x, y, t: r.audit(m, (x, y), TM, results=5), TypeError,
     ["results=", "int 5", "Results.load"]),
    ("certify-loader-drop_last", lambda m, x, y, t: r.certify(m, _dropping(x, y), TM), ValueError,
     ["certify", "drop_last=True", "batch_size=4, 6 samples", "drop_last=False"]),
    ("audit-loader-drop_last", lambda m, x, y, t: r.audit(m, _dropping(x, y), TM), ValueError,
     ["drop_last=True", "batch_size=4, 6 samples"]),
    ("audit-suite_kwargs-unknown", lambda m, x, y, t: r.audit(m, (x, y), TM, suite_kwargs={"foo": 1}), TypeError,
     ["suite_kwargs", "['foo']", "square_queries"]),
    ("get_suite-unknown-kwarg", lambda m, x, y, t: r.get_suite("standard", TM, foo=1), TypeError,
     ["'standard'", "['foo']"]),
    ("get_suite-name", lambda m, x, y, t: r.get_suite("nosuch", TM), ValueError, ["suite", "'nosuch'", "standard"]),
    ("get_suite-square_queries", lambda m, x, y, t: r.get_suite("standard", TM, square_queries=0), ValueError,
     ["square_queries", "got 0"]),
    ("get_suite-square_queries-ceiling", lambda m, x, y, t: r.get_suite("standard", TM, square_queries=10**9),
     ValueError, ["square_queries=1000000000", "RELUCAP_ALLOW_LARGE_BUDGET"]),
    ("get_attack-override-owned-by-threat-model", lambda m, x, y, t: r.get_attack("torchattacks:Square", TM,
                                                                                   n_queries=10**9),
     ValueError, ["n_queries=1000000000", "ThreatModel field"]),
    ("bpda-mode", lambda m, x, y, t: r.bpda("torch:PGD", TM, mode="magic"), ValueError, ["mode", "'magic'"]),
    ("bpda-temperature", lambda m, x, y, t: r.bpda("torch:PGD", TM, temperature=-1), ValueError,
     ["temperature", "-1"]),
    ("bpda-spec-without-threat-model", lambda m, x, y, t: r.bpda("torch:PGD"), ValueError,
     ["'torch:PGD'", "threat_model="]),
    ("transfer-surrogate-int", lambda m, x, y, t: r.transfer("torch:PGD", TM, surrogate=5), TypeError,
     ["surrogate", "int 5"]),
    ("uncapped_twin-int", lambda m, x, y, t: r.uncapped_twin(5), TypeError, ["uncapped_twin", "int 5"]),
    ("surrogate_gradients-model-int", lambda m, x, y, t: r.surrogate_gradients(5).__enter__(), TypeError,
     ["surrogate_gradients", "int 5"]),
    ("perturbation_growth-shapes", lambda m, x, y, t: r.perturbation_growth(m, x, x[:2]), ValueError,
     ["x_adv", "shape=(6, 1, 4, 4)", "shape=(2, 1, 4, 4)"]),
    ("certify-method", lambda m, x, y, t: r.certify(m, (x, y), TM, method="exact"), ValueError,
     ["method", "'exact'"]),
    ("certify-threat_model-float", lambda m, x, y, t: r.certify(m, (x, y), 0.1), TypeError,
     ["threat_model", "float 0.1"]),
    ("certify-model-str", lambda m, x, y, t: r.certify("m", (x, y), TM), TypeError, ["certify", "str 'm'"]),
    ("certify-chunk", lambda m, x, y, t: r.certify(m, (x, y), TM, chunk=0), ValueError, ["chunk", "0"]),
    ("certify-max_neurons", lambda m, x, y, t: r.certify(m, (x, y), TM, max_neurons=0), ValueError,
     ["max_neurons", "0"]),
    ("certify-config-int", lambda m, x, y, t: r.certify(m, (x, y), TM, config=5), TypeError, ["config", "int 5"]),
    ("certify-model_name-int", lambda m, x, y, t: r.certify(m, (x, y), TM, model_name=5), TypeError,
     ["model_name", "int 5"]),
    ("certify-x-nan", lambda m, x, y, t: r.certify(m, (x * math.nan, y), TM, progress=False), ValueError,
     ["certify: data samples 0..5", "NaN/inf"]),
    ("certify-x-out-of-bounds", lambda m, x, y, t: r.certify(m, (x + 2, y), TM, progress=False), ValueError,
     ["certify: data samples 0..5", "bounds (0.0, 1.0)"]),
    ("certify-labels-out-of-range", lambda m, x, y, t: r.certify(m, (x, y + 7), TM, progress=False), ValueError,
     ["labels must be in [0, 2]", "labels in [7,"]),
    ("certify-data-wrong-shape", lambda m, x, y, t: r.certify(m, (torch.rand(6, 3, 8, 8), y), TM, progress=False),
     ValueError, ["certify: data (batch 0)", "shape (6, 3, 8, 8)", "torch.randn(1, 16)"]),
    # experiment configuration
    ("ExperimentConfig-caps-str", lambda m, x, y, t: _experiment_config(caps="abc"), TypeError,
     ["caps must be a tuple of floats", "str 'abc'"]),
    ("ExperimentConfig-eps-number", lambda m, x, y, t: _experiment_config(eps=0.1), TypeError,
     ["eps must be a tuple", "float 0.1"]),
    ("ExperimentConfig-positions-str", lambda m, x, y, t: _experiment_config(positions="all"), TypeError,
     ["positions", "str 'all'"]),
    ("ExperimentConfig-widths-zero", lambda m, x, y, t: _experiment_config(widths=(0,)), ValueError,
     ["widths", "(0,)"]),
    ("ExperimentConfig-lr", lambda m, x, y, t: _experiment_config(lr=-1), ValueError, ["lr", "-1"]),
    ("ExperimentConfig-train_eps", lambda m, x, y, t: _experiment_config(train_eps="a"), ValueError,
     ["train_eps", "'a'"]),
    ("ExperimentConfig-fgsm_best", lambda m, x, y, t: _experiment_config(fgsm_best="no"), TypeError,
     ["fgsm_best", "'no'"]),
    ("ExperimentConfig-seed", lambda m, x, y, t: _experiment_config(seed=-1), ValueError, ["seed", "-1"]),
    ("run_experiment-config-dict", lambda m, x, y, t: r.experiment.run_experiment({"epochs": 1}), TypeError,
     ["config", "dict {'epochs': 1}", "preset('demo'"]),
    ("run_experiment-out-a-file", lambda m, x, y, t: r.experiment.run_experiment(out=_text(t)), NotADirectoryError,
     ["out=", "notes.txt", "not a folder"]),
    # results files
    ("Results.load-missing", lambda m, x, y, t: r.Results.load(t / "none.jsonl"), FileNotFoundError,
     ["results file", "none.jsonl"]),
    ("Results.load-text-file", lambda m, x, y, t: r.Results.load(_text(t)), ValueError,
     ["notes.txt", "not a relucap results file"]),
    ("Results.merge-int", lambda m, x, y, t: r.Results().merge(5), TypeError, ["merge", "int 5"]),
    ("Results-row-fields", lambda m, x, y, t: r.Results([{"sample": 0}]), ValueError,
     ["{'sample': 0}", "'attack'"]),
]


class _Unlabelled(torch.utils.data.Dataset):
    """A Dataset that forgot its labels (returns images only)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _conv():
    """A conv layer's ReLU: 4 channels on 1x4x4 inputs (a per-channel cap needs 4 entries)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _dropping(x, y):
    """A DataLoader over six samples in batches of 4 that drops the last two."""
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True)


def _experiment_config(**settings):
    return r.experiment.ExperimentConfig(**settings)


def _not_gzip(folder):
    """A folder whose MNIST training images are a .gz file that is not gzip."""
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    return folder


def _text(folder):
    path = folder / "notes.txt"
    path.write_text("hello\n")
    return path


@pytest.mark.parametrize("call, error, parts", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_errors_name_the_argument_and_value(kit, tmp_path, call, error, parts):
    model, x, y = kit
    with pytest.raises(error) as info:
        call(model, x, y, tmp_path)
    message = str(info.value)
    missing = [p for p in parts if p not in message]
    assert not missing, f"{missing} not in: {message}"


def test_api_table_is_broad_and_has_no_duplicate_ids():
    ids = [c[0] for c in API_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 60


# ------------------------------------------------------------------------------ CLI
@pytest.fixture
def cli_data(tmp_path, monkeypatch):
    """A tiny .npz data file (4 MNIST-shaped samples) and a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.random((4, 1, 28, 28), dtype=np.float32), y=np.array([0, 1, 2, 3]))
    (tmp_path / "notes.txt").write_text("hello\n")
    return "d.npz"


EVAL = ["evaluate", "mlp:8", "--data", "d.npz", "--quiet"]

# (id, argv, substrings of stderr): each names the flag and the value given
CLI_CASES = [
    ("eps-negative", [*EVAL, "--eps", "-1", "--attack", "torch:FGSM"], ["--eps", "-1.0"]),
    ("eps-not-a-number", [*EVAL, "--eps", "abc", "--attack", "torch:FGSM"], ["--eps", "'abc'", "8/255"]),
    ("eps-twice", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--eps", "0.3"],
     ["option given twice: --eps", "--eps 0.1 0.3"]),
    ("model-widths", ["evaluate", "mlp:x", "--data", "d.npz", "--eps", "0.1", "--attack", "torch:FGSM"],
     ["model 'mlp:x'", "mlp:256,32,256"]),
    ("model-unknown", ["evaluate", "nosuchmodel", "--eps", "0.1", "--attack", "torch:FGSM"],
     ["'nosuchmodel'", "package.module:factory"]),
    ("model-function", ["inspect", "os:abort"], ["model 'os:abort'", "register_model"]),
    ("attack-library", [*EVAL, "--eps", "0.1", "--attack", "zz:PGD"], ["--attack", "'zz:PGD'", "torchattacks"]),
    ("attack-name", [*EVAL, "--eps", "0.1", "--attack", "torch:Nope"], ["--attack", "'Nope'"]),
    ("attack-spec-eps", [*EVAL, "--eps", "0.1", "--attack", "torch:PGD(eps=0.3)"], ["torch:PGD", "eps=0.3"]),
    ("suite", [*EVAL, "--eps", "0.1", "--suite", "nosuch"], ["--suite", "'nosuch'", "standard"]),
    ("no-attack", [*EVAL, "--eps", "0.1"], ["--attack SPEC", "--suite standard"]),
    ("data-missing", ["evaluate", "mlp:8", "--data", "nope.npz", "--eps", "0.1", "--attack", "torch:FGSM"],
     ["--data 'nope.npz'", "no such file"]),
    ("data-text-file", ["evaluate", "mlp:8", "--data", "notes.txt", "--eps", "0.1", "--attack", "torch:FGSM"],
     ["--data 'notes.txt'"]),
    ("checkpoint-missing", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--checkpoint", "none.pt"],
     ["checkpoint 'none.pt'", "does not exist"]),
    ("checkpoint-text-file", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--checkpoint", "notes.txt"],
     ["checkpoint 'notes.txt'", "save_checkpoint"]),
    ("norm", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--norm", "L3"], ["--norm", "'L3'"]),
    ("batch-size", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--batch-size", "0"], ["--batch-size", "0"]),
    ("steps", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--steps", "0"], ["--steps", "got 0"]),
    ("restarts", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--restarts", "0"], ["--restarts", "got 0"]),
    ("step-size", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--step-size", "-1"], ["--step-size", "-1.0"]),
    ("device", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--device", "tpu"], ["--device", "'tpu'"]),
    ("input-shape", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--input-shape", "1,x"],
     ["--input-shape '1,x'", "1,28,28"]),
    ("square-queries", [*EVAL, "--eps", "0.1", "--suite", "standard", "--square-queries", "0"],
     ["--square-queries", "got 0"]),
    ("out-a-file", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--out", "notes.txt"],
     ["--out 'notes.txt'", "folder"]),
    ("seed", [*EVAL, "--eps", "0.1", "--attack", "torch:FGSM", "--seed", "x"], ["--seed", "'x'"]),
    ("inspect-input-shape", ["inspect", "mlp:8", "--input-shape", "1,a"], ["--input-shape '1,a'"]),
    ("certify-method", ["certify", "mlp:8", "--eps", "0.1", "--method", "exact"], ["--method", "'exact'"]),
    ("demo-caps", ["demo", "--caps", "-1"], ["--caps", "-1.0"]),
    ("demo-epochs", ["demo", "--epochs", "0"], ["--epochs", "0"]),
    ("demo-n-train", ["demo", "--n-train", "3"], ["--n-train", "3"]),
    ("demo-eps", ["demo", "--eps", "-0.1"], ["--eps", "-0.1"]),
    ("demo-device", ["demo", "--device", "tpu"], ["--device", "'tpu'"]),
]


def _run_cli(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.mark.parametrize("argv, parts", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_errors_name_the_flag_and_value(cli_data, capsys, argv, parts):
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err
    missing = [p for p in parts if p not in err]
    assert not missing, f"{missing} not in: {err}"
    assert "Traceback" not in err


def test_accuracy_warns_about_a_loader_that_drops_samples(kit):
    """accuracy() on a drop_last loader would score 4 of 6 samples without a word."""
    model, x, y = kit
    with pytest.warns(UserWarning, match=r"accuracy: data= is a DataLoader that drops .*6 samples"):
        r.accuracy(model, _dropping(x, y))


def test_a_limit_within_the_kept_batches_is_not_refused(kit):
    """certify(n_samples=4) on that loader sees every sample it asked for: no refusal."""
    model, x, y = kit
    res = r.certify(model, _dropping(x, y), TM, config=r.EvalConfig(n_samples=4), progress=False)
    assert res.metadata["n_samples"] == 4
