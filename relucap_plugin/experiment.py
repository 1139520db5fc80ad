"""The experiment of arXiv 2405.03777 as one call: cap, train, attack, audit, report.

:func:`run_experiment` trains a paper-style MLP with plain ReLU and with capped ReLUs over a
grid (cap x layer position x training), evaluates every model with the same PGD through
torchattacks, Foolbox and ART and with the honest ``"standard"`` suite, audits it for gradient
masking, and writes results files, plots and a Markdown report. ``relucap demo`` and
``relucap reproduce`` are this one function with the :func:`preset` ``"demo"`` or
``"reproduce"``. One more model is trained for a certificate (IBP or CROWN-IBP training of a
capped net), and every model gets a certified column: the fraction of samples whose bound
proves robustness, the lower side of the bracket certified <= robust <= worst case.

Caps are installed with :func:`~relucap_plugin.surgery.cap_relus` on the *untrained* network,
then the capped network is trained: the paper trains capped networks. Every model starts from
the same initial weights (the ReLU net built after ``torch.manual_seed(seed)``), so the models
of a grid differ only in their activations and training.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from ._format import pct
from .threat import EvalConfig, ThreatModel

__all__ = [
    "DEMO_CAPS",
    "LIBRARY_PGD",
    "PAPER_CAPS",
    "POSITIONS",
    "ExperimentConfig",
    "ExperimentResult",
    "ModelResult",
    "ModelSpec",
    "preset",
    "run_experiment",
]

PAPER_CAPS = (0.01, 0.1, 1.0, 10.0, 100.0)
"""The cap grid of arXiv 2405.03777."""
DEMO_CAPS = (0.1, 1.0, 10.0)

#: Layer position -> the ``sites`` argument of :func:`~relucap_plugin.surgery.cap_relus`.
POSITIONS: dict[str, Any] = {"all": None, "bottleneck": "bottleneck", "first": [0], "last": [-1]}

#: The same PGD through each library (one ThreatModel configures all three): library -> spec.
LIBRARY_PGD = {
    "torchattacks": "torchattacks:PGD",
    "foolbox": "foolbox:LinfPGD",
    "art": "art:ProjectedGradientDescent",
}

_DATASETS = ("mnist5k", "digits")
_TRAININGS = ("standard", "fgsm", "fgsm_rs", "pgd")
_CERTIFIED_TRAININGS = ("ibp", "crown_ibp")


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one run; the report lists them all.

    Grid: ``caps`` x ``positions`` (keys of :data:`POSITIONS`) x ``trainings`` (methods of
    :func:`~relucap_plugin.training.train`), plus plain ReLU per training. ``fgsm_best`` adds
    FGSM adversarial training of plain ReLU and of the best capped model (highest worst-case
    robust accuracy at ``table_eps`` among the capped models of the first training; ties go to
    higher clean accuracy, then to the earlier grid cell). ``pssilu`` adds PSSiLU (Dai et al.,
    one alpha/beta for the whole network). Attacks: L-inf, budgets ``eps``, ``steps`` steps of
    ``2.5 * eps / steps``, random start, ``restarts`` runs; Square with ``square_queries``
    queries. ``n_samples`` test digits are attacked; ``n_train`` limits the training set.
    ``certified_training`` (``"ibp"``, ``"crown_ibp"`` or None) adds one model: caps of
    ``certified_cap`` on every site, trained for a certificate at ``train_eps``. Every model is
    certified at every eps with ``certify_method`` (a method of
    :func:`~relucap_plugin.certification.certify`; IBP by default, as it costs about as much as
    a few forward passes).
    ``threads``: torch's intra-op threads during the run (restored after it); 1 by default, as
    these small MLPs gain nothing from more and lose much time on a busy CPU. ``None`` keeps
    torch's setting.
    """

    caps: tuple[float, ...] = DEMO_CAPS
    positions: tuple[str, ...] = ("all", "bottleneck")
    trainings: tuple[str, ...] = ("standard",)
    fgsm_best: bool = True
    pssilu: bool = False
    certified_training: str | None = "ibp"
    certified_cap: float = 1.0
    certify_method: str = "ibp"
    widths: tuple[int, ...] = (256, 32, 256)
    data: str = "mnist5k"
    n_train: int | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    train_eps: float = 0.1
    eps: tuple[float, ...] = (0.05, 0.1, 0.2)
    table_eps: float | None = 0.1
    n_samples: int = 200
    steps: int = 20
    restarts: int = 1
    square_queries: int = 300
    seed: int = 0
    device: str = "auto"
    threads: int | None = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name, kind in (("caps", float), ("eps", float), ("widths", int), ("positions", str),
                           ("trainings", str)):
            set_(self, name, _sequence(name, getattr(self, name), kind))
        for name, value in (("lr", self.lr), ("train_eps", self.train_eps), *(("widths", w) for w in self.widths)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)!r:.40}")
        for name in ("fgsm_best", "pssilu"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r:.40}")
        if isinstance(self.seed, int) and self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed}")
        if not self.caps or any(not (c > 0) for c in self.caps):
            raise ValueError(f"caps must be numbers > 0 (got {self.caps}); math.inf is plain ReLU, "
                             "which every grid includes anyway")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"positions {bad or '()'} unknown; choose from {', '.join(POSITIONS)}")
        bad = [t for t in self.trainings if t not in _TRAININGS]
        if bad or not self.trainings:
            raise ValueError(f"trainings {bad or '()'} unknown; choose from {', '.join(_TRAININGS)}")
        if self.certified_training not in (*_CERTIFIED_TRAININGS, None):
            raise ValueError(f"certified_training must be one of {', '.join(_CERTIFIED_TRAININGS)} "
                             f"or None (no certified-trained model), got {self.certified_training!r}")
        if isinstance(self.certified_cap, bool) or not (
                isinstance(self.certified_cap, (int, float)) and 0 < self.certified_cap < math.inf):
            raise ValueError(f"certified_cap must be a finite number > 0, got {self.certified_cap!r}")
        from .certification import METHODS

        if self.certify_method not in METHODS:
            raise ValueError(f"certify_method must be one of {', '.join(METHODS)} (got "
                             f"{self.certify_method!r})")
        if self.data not in _DATASETS:
            raise ValueError(f"data must be one of {', '.join(_DATASETS)} (got {self.data!r})")
        if not self.eps:
            raise ValueError("eps must hold at least one budget, e.g. eps=(0.1,)")
        if self.table_eps is not None and float(self.table_eps) not in self.eps:
            raise ValueError(f"table_eps {self.table_eps} is not one of eps {self.eps}; add it to "
                             "eps or pass table_eps=None (the largest eps)")
        for name in ("epochs", "batch_size", "n_samples", "steps", "restarts", "square_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (got {value!r})")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an int >= 1 or None (torch's setting), got "
                             f"{self.threads!r}")
        if self.n_train is not None and (not isinstance(self.n_train, int) or self.n_train < 10):
            raise ValueError(f"n_train must be an int >= 10 or None (all), got {self.n_train!r}")
        self.threat_model(), self.eval_config()  # eps, device: refused now, not after training

    @property
    def headline_eps(self) -> float:
        """The budget of the one-row-per-model table (``table_eps``, else the largest eps)."""
        return float(self.table_eps) if self.table_eps is not None else max(self.eps)

    def threat_model(self) -> ThreatModel:
        """The one threat model every attack of the run is configured from."""
        return ThreatModel(norm="Linf", eps=self.eps, steps=self.steps, restarts=self.restarts,
                           random_start=True, bounds=(0.0, 1.0))

    def eval_config(self) -> EvalConfig:
        return EvalConfig(batch_size=256, device=self.device, seed=self.seed,
                          n_samples=self.n_samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sequence(name: str, value: Any, kind: type) -> tuple:
    """``value`` (a list or tuple) as a tuple of ``kind``; a bare string or number, or an entry
    that is not a ``kind``, is refused naming the setting."""
    if isinstance(value, (list, tuple)):
        ok = (lambda v: isinstance(v, str)) if kind is str else (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            and (kind is float or float(v).is_integer()))
        if all(ok(v) for v in value):
            return tuple(kind(v) for v in value)
    raise TypeError(f"{name} must be a tuple of {kind.__name__}s, e.g. {name}={getattr(ExperimentConfig, name)}; got "
                    f"{type(value).__name__} {value!r:.80}")


_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "reproduce": {
        "caps": PAPER_CAPS, "positions": tuple(POSITIONS), "trainings": ("standard", "fgsm"),
        "fgsm_best": False, "epochs": 10, "eps": (0.05, 0.1, 0.2, 0.3), "table_eps": 0.1,
        "n_samples": 500, "steps": 40, "square_queries": 5000,
    },
}


def preset(name: str, **overrides: Any) -> ExperimentConfig:
    """The configuration of ``relucap demo`` (``"demo"``) or ``relucap reproduce``
    (``"reproduce"``: the paper's cap grid x all/bottleneck/first/last x standard/FGSM
    training, more epochs, samples, budgets and queries), with ``overrides`` applied.

    ``full_grid=True`` swaps in :data:`PAPER_CAPS`. Overrides that are ``None`` are ignored.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(_PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.pop("full_grid", False):
        overrides.setdefault("caps", PAPER_CAPS)
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(known)}")
    settings = {**_PRESETS[name], **overrides}
    if "eps" in overrides and "table_eps" not in overrides:
        eps = tuple(float(e) for e in settings["eps"])
        table_eps = settings.get("table_eps", ExperimentConfig.table_eps)
        if table_eps is not None and float(table_eps) not in eps:
            settings["table_eps"] = None
    return ExperimentConfig(**settings)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid: ``cap`` (``inf`` = ReLU) at ``position``, or another
    ``activation`` on every site; trained with ``training``."""

    cap: float = math.inf
    position: str = "all"
    training: str = "standard"
    activation: str | None = None

    @property
    def capped(self) -> bool:
        return self.activation is None and math.isfinite(self.cap)

    @property
    def name(self) -> str:
        if self.activation is not None:
            base = self.activation
        elif not self.capped:
            base = "relu"
        else:
            base = f"cap {self.cap:g} {self.position}"
        return base if self.training == "standard" else f"{base} +{self.training.upper()}"

    @property
    def slug(self) -> str:
        """File-name form of :attr:`name`."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name.replace("+", "")).strip("-").lower()


@dataclass
class ModelResult:
    """What one model gave: accuracies per eps, the masking verdict, its files."""

    spec: ModelSpec
    clean: float
    pgd: dict[str, dict[float, float | None]]
    worst_case: dict[float, float | None]
    attacks: dict[str, dict[float, float | None]]
    verdict: str
    fired: list[str]
    capped_sites: dict[str, str]
    train_history: dict[str, Any]
    results_file: str | None
    checkpoint: str | None
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    level: str = "no sign"
    over_report: dict[str, Any] | None = None
    certified: dict[float, float | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "spec")}
        return {"name": self.name, "spec": asdict(self.spec), **d}


def short_verdict(level: str, over: dict[str, Any] | None = None, eps: float | None = None) -> str:
    """The calibrated verdict for a table cell: ``"measured +X pts [lo, hi]"`` (PGD's
    over-report at ``eps``, default the audit's headline eps), ``"risk factors only"`` or
    ``"no sign"`` (levels of :func:`relucap_plugin.diagnostics.verdict`)."""
    if level == "masking measured" and over:
        at = (over.get("per_eps") or {}).get(eps, over) if eps is not None else over
        lo, hi = at["interval"]
        return f"measured +{100 * at['over_report']:.1f} pts [{100 * lo:.1f}, {100 * hi:.1f}]"
    return level


def fired_labels(fired: Sequence[str]) -> str:
    """The short labels (:data:`relucap_plugin.diagnostics.CHECKS`) of the fired checks, comma-separated."""
    from .diagnostics import CHECKS

    return ", ".join(CHECKS[f].label if f in CHECKS else f for f in fired)


@dataclass
class ExperimentResult:
    """All models of a run, the model chosen as best cap, and where the files went."""

    config: ExperimentConfig
    models: list[ModelResult]
    best: str | None
    out: str | None
    seconds: float = 0.0
    growth: Any = None
    growth_model: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    TABLE_COLUMNS = ("model", "clean", *(f"PGD {lib}" for lib in LIBRARY_PGD), "worst case",
                     "certified", "masking verdict")

    def table_rows(self, eps: float | None = None) -> list[tuple[str, ...]]:
        """One row per model at ``eps`` (default the headline budget): the columns of
        :attr:`TABLE_COLUMNS` as text. Times are left out, so equal seeds give equal rows."""
        eps = self.config.headline_eps if eps is None else float(eps)
        return [
            (m.name, pct(m.clean), *(pct(m.pgd[lib].get(eps)) for lib in LIBRARY_PGD),
             pct(m.worst_case.get(eps)), pct(m.certified.get(eps)),
             short_verdict(m.level, m.over_report, eps))
            for m in self.models
        ]

    def title(self) -> str:
        c = self.config
        return (f"relucap: MLP {'-'.join(map(str, c.widths))} on {c.data}, L-inf eps "
                f"{c.headline_eps:g}, PGD-{c.steps}, {c.n_samples} test samples, seed {c.seed}")

    def print(self, file=None) -> None:
        """The one-row-per-model table (rich if installed)."""
        from ._console import print_table

        columns = [c.replace(" ", "\n", 1) for c in self.TABLE_COLUMNS]  # narrow headers
        print_table(columns, self.table_rows(), title=self.title(), file=file)
        if any(m.fired for m in self.models):
            print("masking checks that fired (docs/honest-evaluation.md explains each):", file=file)
        for m in self.models:
            if m.fired:
                print(f"  {m.name}: {fired_labels(m.fired)}", file=file)
        if self.best is not None:
            print(f"best cap (highest worst case at eps {self.config.headline_eps:g}): {self.best}",
                  file=file)

    def model(self, name: str) -> ModelResult:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r}; models: {', '.join(m.name for m in self.models)}")

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "best": self.best, "seconds": self.seconds,
                "versions": self.versions, "growth_model": self.growth_model,
                "models": [m.to_dict() for m in self.models]}


# ------------------------------------------------------------------------------ running


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def _load_data(config: ExperimentConfig):
    from .data import load_digits_dataset, load_mnist5k

    train_set, test_set = (load_mnist5k if config.data == "mnist5k" else load_digits_dataset)(
        seed=config.seed)
    x, y = train_set.tensors
    if config.n_train is not None:
        x, y = x[:config.n_train], y[:config.n_train]
    return (x, y), test_set.tensors


def certified_spec(config: ExperimentConfig) -> ModelSpec | None:
    """The certified-trained model of the run (``None`` when ``certified_training`` is None)."""
    if config.certified_training is None:
        return None
    return ModelSpec(config.certified_cap, "all", config.certified_training)


def grid(config: ExperimentConfig) -> list[ModelSpec]:
    """The models trained before the best cap is known, in table order."""
    specs = []
    for training in config.trainings:
        specs.append(ModelSpec(training=training))
        specs += [ModelSpec(cap, position, training)
                  for position in config.positions for cap in config.caps]
    if config.pssilu:
        specs.append(ModelSpec(activation="pssilu"))
    return specs


def pick_best(models: Sequence[ModelResult], config: ExperimentConfig) -> ModelResult | None:
    """The capped model of the first training with the highest worst-case robust accuracy at
    the headline eps; ties go to higher clean accuracy, then to the earlier grid cell."""
    eps = config.headline_eps
    candidates = [m for m in models if m.spec.capped and m.spec.training == config.trainings[0]]
    if not candidates:
        return None
    return max(candidates, key=lambda m: (m.worst_case.get(eps) or 0.0, m.clean))


def build_model(spec: ModelSpec, config: ExperimentConfig, example: torch.Tensor
                ) -> tuple[nn.Module, dict[str, str]]:
    """The untrained network of ``spec`` and the sites it changed (site -> new activation).

    The ReLU MLP is built under ``torch.manual_seed(config.seed)`` (the caller's RNG state is
    kept), then :func:`~relucap_plugin.surgery.cap_relus` installs the caps.
    """
    from .activations import share_parameters
    from .models import mlp
    from .surgery import cap_relus

    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        net = mlp(config.widths, in_shape=tuple(example.shape[1:]))
    if spec.activation is not None:
        net, report = cap_relus(net, spec.activation, example_input=example)
        share_parameters(net)
        return net, dict(report.replaced)
    if not spec.capped:
        return net, {}
    net, report = cap_relus(net, spec.cap, sites=POSITIONS[spec.position], example_input=example)
    return net, dict(report.replaced)


def _attacks(config: ExperimentConfig, tm: ThreatModel, model: Any, example: torch.Tensor) -> list[Any]:
    from .adaptive import get_suite
    from .attacks import get_attack

    library = [get_attack(spec, tm) for spec in LIBRARY_PGD.values()]
    suite = get_suite("standard", tm, model, example, square_queries=config.square_queries)
    return [*library, *suite, get_attack("torch:FGSM", tm)]


def run_model(spec: ModelSpec, config: ExperimentConfig, train_data, eval_data,
              out: str | None, progress: bool = True) -> ModelResult:
    """Build, train, evaluate, audit and certify one model; its rows (attacks and certificates)
    go to ``out/results/<slug>.jsonl``. A sample certified yet broken raises
    :class:`~relucap_plugin.results.BracketError`."""
    from .certification import certify
    from .diagnostics import audit
    from .evaluation import evaluate
    from .training import save_checkpoint, train

    start = time.perf_counter()
    net, sites = build_model(spec, config, eval_data[0][:1])
    history = train(net, train_data, spec.training, epochs=config.epochs, lr=config.lr,
                    batch_size=config.batch_size, eps=config.train_eps, seed=config.seed,
                    device=config.device, progress=progress)
    tm, cfg = config.threat_model(), config.eval_config()
    attacks = _attacks(config, tm, net, eval_data[0][:8])
    results_file = checkpoint = None
    if out is not None:
        results_file = os.path.join(out, "results", f"{spec.slug}.jsonl")
        checkpoint = save_checkpoint(net, os.path.join(out, "models", f"{spec.slug}.pt"))
    names = {a.spec: a for a in attacks}
    pgd_names = {lib: next(n for n in names if n.startswith(s)) for lib, s in LIBRARY_PGD.items()}
    # the audit's cascade; the libraries' PGDs run on every sample for the agreement table
    results = evaluate(net, eval_data, attacks, tm, cfg, out=results_file, resume=False,
                       progress=progress, model_name=spec.name, schedule="audit",
                       unconditional=list(pgd_names.values()))
    report = audit(net, eval_data, tm, cfg, results=results, model_name=spec.name)
    cert = certify(net, eval_data, tm, config.certify_method, cfg, progress=False,
                   model_name=spec.name)
    merged = results.merge(cert)  # the bracket check: certified and broken is an error
    if results_file is not None:
        merged.save(results_file)
    return ModelResult(
        spec=spec,
        clean=results.clean_accuracy() or 0.0,
        pgd={lib: {e: results.robust_accuracy(n, e) for e in tm.eps} for lib, n in pgd_names.items()},
        worst_case={e: results.worst_case(e) for e in tm.eps},
        certified={e: cert.certified(e) for e in tm.eps},
        attacks={a: {e: results.robust_accuracy(a, e) for e in tm.eps} for a in results.attacks},
        verdict=report.verdict,
        fired=[f.name for f in report.flags if f.fired],
        level=report.level,
        over_report=_plain(report.over_report),
        capped_sites=sites,
        train_history=history.to_dict(),
        versions=dict(results.metadata.get("versions") or {}),
        results_file=results_file,
        checkpoint=checkpoint,
        seconds=time.perf_counter() - start,
        model=net,
    )


def _plain(over: dict[str, Any] | None) -> dict[str, Any] | None:
    """:func:`~relucap_plugin.diagnostics.over_report` with lists for tuples (JSON-able)."""
    if over is None:
        return None
    out = {k: v for k, v in over.items() if k != "per_eps"}
    out["interval"] = list(out["interval"])
    out["per_eps"] = {e: {**v, "interval": list(v["interval"])} for e, v in over["per_eps"].items()}
    return out


def _growth(best: ModelResult | None, eval_data, config: ExperimentConfig):
    """Perturbation growth per layer of ``best`` and its uncapped twin under PGD at the
    headline eps; ``None`` when there is no capped model."""
    from .attacks import get_attack
    from .diagnostics import perturbation_growth

    if best is None or best.model is None:
        return None
    x, y = eval_data
    eps = config.headline_eps
    x_adv = get_attack("torch:PGD", config.threat_model().replace(eps=(eps,)))(
        best.model, x, y, eps, seed=config.seed)
    return perturbation_growth(best.model, x, x_adv.detach())


def run_experiment(config: ExperimentConfig | None = None, out: str | os.PathLike | None = None,
                   progress: bool = True, keep_models: bool = False) -> ExperimentResult:
    """Run the grid of ``config`` (default: the demo), then FGSM training of ReLU and of the
    best cap if ``config.fgsm_best``; write results, checkpoints, plots and ``report.md`` to
    ``out`` (nothing is written when it is ``None``). ``progress`` prints one line per stage
    and progress bars on stderr. Models are dropped from the result unless ``keep_models``.
    """
    config = config or preset("demo")
    if not isinstance(config, ExperimentConfig):
        raise TypeError(f"run_experiment: config must be an ExperimentConfig (preset('demo', **settings) "
                        f"or ExperimentConfig(**settings)), got {type(config).__name__} {config!r:.80}")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"run_experiment: out={os.fspath(out)!r} is a file, not a folder; "
                                 "pass a folder (it is created if missing)")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, None if out is None else os.fspath(out), progress, keep_models)
    finally:
        torch.set_num_threads(threads)


def _run(config: ExperimentConfig, folder: str | None, progress: bool, keep_models: bool
         ) -> ExperimentResult:
    from .report import write_report

    start = time.perf_counter()
    if folder is not None:
        for sub in ("results", "models"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
    train_data, test = _load_data(config)
    eval_data = (test[0][:config.n_samples], test[1][:config.n_samples])
    specs = grid(config)
    certified = certified_spec(config)
    total = len(specs) + (2 if config.fgsm_best else 0) + (certified is not None)
    models: list[ModelResult] = []

    def run(spec: ModelSpec) -> None:
        _log(f"[{len(models) + 1}/{total}] {spec.name}: cap, train ({spec.training}, "
             f"{config.epochs} epochs), attack, audit, certify", progress)
        models.append(run_model(spec, config, train_data, eval_data, folder, progress))
        m = models[-1]
        eps = config.headline_eps
        _log(f"      clean {pct(m.clean)}, PGD {pct(m.pgd['torchattacks'][eps])}, worst case "
             f"{pct(m.worst_case[eps])}, certified {pct(m.certified[eps])} at eps {eps:g} "
             f"({m.seconds:.1f} s)", progress)

    for spec in specs:
        run(spec)
    best = pick_best(models, config)
    if config.fgsm_best:
        for spec in (ModelSpec(training="fgsm"),
                     None if best is None else replace(best.spec, training="fgsm")):
            if spec is not None and spec not in [m.spec for m in models]:
                run(spec)
    if certified is not None and certified not in [m.spec for m in models]:
        run(certified)
    growth = _growth(best, eval_data, config)
    result = ExperimentResult(
        config=config, models=models, best=None if best is None else best.name, out=folder,
        growth=growth, growth_model=None if best is None else best.name,
        versions=models[0].versions if models else {},
    )
    result.seconds = time.perf_counter() - start
    if folder is not None:
        write_report(result, folder)
    if not keep_models:
        for m in models:
            m.model = None
    return result
