"""Evaluation spread over the processes of a ``torchrun`` launch (one model replica per process).

:func:`~relucap_plugin.evaluation.evaluate` asks :func:`process_context` where it runs: alone, a
:class:`LocalContext` (world size 1, files as they always were); inside a process group of more
than one rank (:func:`setup`), a :class:`DistContext` that gives rank ``r`` the batches number
``b`` with ``b % world_size == r`` of the single-process batching (same boundaries, global
sample indices, no padding). Every attack call
is seeded from (seed, attack, eps, first sample of its batch), so each row equals the row of a
single-process run whatever the number of ranks. Each rank streams its rows to its own JSONL
shard (``results.rank0-of-2.jsonl`` next to ``results.jsonl``); at the end rank 0 gathers the
rows into one :class:`~relucap_plugin.results.Results` and writes the merged ``results.jsonl``.
A rerun of the same command resumes from the shards and the merged file (any world size).
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from ._files import check_target
from ._fingerprint import DataDigest, differences, model_digest
from .data import numbered_batches
from .results import Results, ResultsWriter, load_same_evaluation, open_results_file
from .threat import resolve_device

__all__ = [
    "DistContext",
    "LocalContext",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "merge_shards",
    "process_context",
    "setup",
    "shard_files",
    "shard_path",
]

#: Seconds a rank waits for the others in the final gather (``RELUCAP_DIST_TIMEOUT`` overrides):
#: a resumed run can leave one rank with hours more work than the others.
DEFAULT_TIMEOUT = 24 * 3600
#: Seconds a rank waits for the others to join at the start (``RELUCAP_RENDEZVOUS_TIMEOUT``
#: overrides): ranks start within seconds of each other, so minutes mean one never comes.
RENDEZVOUS_TIMEOUT = 300

_SHARD = re.compile(r"\.rank(\d+)-of-(\d+)$")


def get_rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if _env_world() > 1 else 0


def get_world_size() -> int:
    """Number of processes: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_world()


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer; unset it "
                         "unless torchrun set it") from None


def _env_world() -> int:
    return _env_int("WORLD_SIZE", "1")


def check_environment() -> int:
    """The world size torchrun's variables describe, after refusing a half-set or leftover
    environment (before any rendezvous, which would wait for ranks that never come)."""
    world = _env_world()
    if world <= 1:
        return 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} not: launch with torchrun "
            "(torchrun --nproc-per-node N ...), or unset WORLD_SIZE to run in one process"
        )
    rank = _env_int("RANK", "0")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}): the "
                         "environment is not torchrun's; unset RANK and WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" not in os.environ and os.environ.get("RELUCAP_DISTRIBUTED") != "1":
        raise ValueError(
            f"WORLD_SIZE={world} and RANK={rank} are set but this process was not started by "
            "torchrun (TORCHELASTIC_RUN_ID is unset): leftover variables would make it wait for "
            "processes that never come. Unset WORLD_SIZE and RANK to run in one process, launch "
            "with torchrun, or set RELUCAP_DISTRIBUTED=1 if another launcher started the ranks"
        )
    return world


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that prints and writes the merged results)."""
    return get_rank() == 0


# ------------------------------------------------------------------------------ files
def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> str:
    """``runs/results.jsonl`` -> ``runs/results.rank0-of-2.jsonl``: the shard ``rank`` writes."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.rank{rank}-of-{world_size}{ext or '.jsonl'}"


def shard_files(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """The shards of ``path`` on disk as (file, rank, world size), sorted by world size, rank."""
    root, ext = os.path.splitext(os.path.abspath(os.fspath(path)))
    folder, stem = os.path.split(root)
    ext = ext or ".jsonl"
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            base, e = os.path.splitext(name)
            m = _SHARD.search(base)
            if e == ext and m and base[: m.start()] == stem:
                found.append((os.path.join(folder, name), int(m.group(1)), int(m.group(2))))
    return sorted(found, key=lambda f: (f[2], f[1]))




def merge_shards(path: str | os.PathLike, save: bool = True) -> Results:
    """``path`` (if it exists) merged with every shard of it; written back to ``path`` if ``save``.

    Idempotent: merging twice, or a shard already in the merged file, adds no row. Use it to
    collect what a crashed distributed run left; ``evaluate`` does it itself when resumed.
    """
    path = os.fspath(path)
    files = ([path] if os.path.exists(path) else []) + [f for f, _, _ in shard_files(path)]
    if not files:
        raise FileNotFoundError(f"no results file {path} and no shards of it (name.rankR-of-W)")
    merged = Results.load(files[0])
    for f in files[1:]:
        merged = merged.merge(Results.load(f))
    if save:
        merged.save(path)
    return merged


def adopt_shards(path: str, results: Results, writer: ResultsWriter, resume: bool) -> None:
    """Single-process hook: resume from the shards of a distributed run (their rows not yet in
    ``results`` are added and appended to ``path``), or delete them when starting over."""
    for f, _, _ in shard_files(path):
        if not resume:
            os.remove(check_target(f, "results", what="shard"))
            continue
        changed = results.add(load_same_evaluation(f, results.metadata).rows)
        if changed:
            writer.write(changed)


# ------------------------------------------------------------------------------ process group
def _rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` when CUDA is available; anything else as given."""
    if str(device).strip().lower() in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return resolve_device(device)


def _timeout(name: str = "RELUCAP_DIST_TIMEOUT", default: float = DEFAULT_TIMEOUT) -> timedelta:
    value = os.environ.get(name, str(default))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{name}={value!r} must be a positive number of seconds, e.g. {default}")
    return timedelta(seconds=seconds)


_GLOO_GROUPS: dict[int, Any] = {}


def _gloo_group() -> Any:
    """A CPU (gloo) group with a long timeout for the object collectives (cached per process
    group): nccl's watchdog would abort a rank waiting for slower ones."""
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo", timeout=_timeout())
    return _GLOO_GROUPS[key]


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup(device: str | torch.device = "auto") -> DistContext | None:
    """This process's place in a process group of more than one rank; ``None`` when alone.

    Uses an initialised process group as is; otherwise, when torchrun's ``WORLD_SIZE`` is above 1,
    initialises one from its environment (``env://``): nccl when the ranks run on CUDA, gloo on
    CPU. ``device`` ``"auto"``/``"cuda"`` becomes ``cuda:LOCAL_RANK`` when CUDA is available.
    """
    if not dist.is_available():
        if _env_world() > 1:
            raise RuntimeError(
                "torchrun started several processes but this torch build has no "
                "torch.distributed; install a torch with distributed support or run one process"
            )
        return None
    if dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        rank_device = _rank_device(device, local_rank)
    else:
        world = check_environment()
        if world <= 1:
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        rank_device = _rank_device(device, local_rank)
        if rank_device.type == "cuda":
            torch.cuda.set_device(rank_device)
        backend = "nccl" if rank_device.type == "cuda" else "gloo"
        wait = _timeout("RELUCAP_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT)
        try:
            dist.init_process_group(backend, timeout=wait)
        except (RuntimeError, dist.DistStoreError) as exc:
            raise RuntimeError(
                f"rank {os.environ['RANK']} waited {wait.total_seconds():g} s for the other "
                f"{world - 1} process(es) at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} and they did not all join ({type(exc).__name__}); "
                "start every rank (torchrun --nproc-per-node N), unset leftover WORLD_SIZE/"
                f"RANK variables, or raise RELUCAP_RENDEZVOUS_TIMEOUT (seconds, now {wait.total_seconds():g})"
            ) from exc
        atexit.register(_destroy)
    if rank_device.type == "cuda" and dist.get_backend() == "nccl":
        torch.cuda.set_device(rank_device)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, rank_device)


def _fingerprint(model: nn.Module) -> str:
    """Digest of the model's parameters and buffers, hashed on their device (see
    :mod:`._fingerprint`)."""
    return model_digest(model)


# ------------------------------------------------------------------------------ sharding
def _batch_plan(loader: DataLoader) -> list[list[Any]] | None:
    """The sample keys of each batch the loader yields, read from its sampler without loading
    data; ``None`` when only iterating tells (iterable datasets, custom batching)."""
    if isinstance(loader.dataset, IterableDataset):
        return None
    batch_sampler = loader.batch_sampler
    sampler = loader.sampler if batch_sampler is None else getattr(batch_sampler, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        # the harness shards whole batches itself: the dataset in index order, no padding
        if loader.batch_size is None:
            raise ValueError(
                "a DataLoader with a DistributedSampler needs a batch_size; or pass the "
                "Dataset itself and let evaluate() shard it"
            )
        n = len(loader.dataset)
        bs = loader.batch_size
        return [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
    if batch_sampler is not None:
        return [list(b) for b in batch_sampler]
    keys = list(loader.sampler)
    if keys and all(isinstance(k, (list, tuple, range)) for k in keys):
        return [list(k) for k in keys]  # a sampler of index lists (as_loader's tensor batches)
    return None


def _subset_loader(loader: DataLoader, keys: list[list[Any]]) -> DataLoader:
    """``loader`` restricted to the batches ``keys`` (same dataset, collation and workers)."""
    kw: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        kw.update(prefetch_factor=loader.prefetch_factor, persistent_workers=False)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=keys, **kw)
    return DataLoader(loader.dataset, sampler=keys, batch_size=None, **kw)


class _Context:
    """What :func:`~relucap_plugin.evaluation.evaluate` asks of its place among the processes
    (:class:`LocalContext` alone, :class:`DistContext` as one rank of several)."""

    def data_digest(self, loader: DataLoader, limit: int | None) -> DataDigest:
        """Digest of every batch of the single-process batching (not only this rank's), so
        that ranks compare the whole data they were given."""
        digest = DataDigest()
        for start, x, y in self.batches(loader, limit, every=True):
            digest.update(start, x, y)
        return digest

    def batches(
        self, loader: DataLoader, limit: int | None, every: bool = False
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        raise NotImplementedError


class LocalContext(_Context):
    """A single process as a distributed context of world size 1: it owns every batch, writes
    ``out=`` itself (adopting the shards a distributed run left there) and gathers nothing, so
    ``evaluate`` has one path. Its run metadata has no ``world_size``."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device):
        self.device = device

    def owns(self, batch_number: int) -> bool:
        return True

    def share(self, n_batches: int) -> int:
        return n_batches

    def batches(
        self, loader: DataLoader, limit: int | None, every: bool = False
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """:func:`~relucap_plugin.data.numbered_batches` of the whole data."""
        return numbered_batches(loader, limit)

    def check_options(self, keep_adversarial: str | None) -> None:
        """Every option of ``evaluate`` works in one process."""

    def metadata(self) -> dict[str, Any]:
        """Fields the context adds to the run's metadata: none in one process."""
        return {}

    def progress_note(self) -> str:
        return ""

    def check_same(self, model: nn.Module, metadata: Mapping[str, Any]) -> None:
        """Nothing to compare in one process."""

    def open_shard(
        self, path: str, metadata: Mapping[str, Any], resume: bool
    ) -> tuple[Results, ResultsWriter]:
        """``path`` itself (rows kept when resuming) and its writer; resuming also adopts the
        rows of a distributed run's shards of ``path``, starting over deletes them."""
        results, writer = open_results_file(path, metadata, resume)
        adopt_shards(path, results, writer, resume)
        return results, writer

    def gather(self, results: Results, path: str | None) -> Results:
        """The table itself: its rows are already in ``path``."""
        return results


def process_context(device: str | torch.device = "auto") -> DistContext | LocalContext:
    """:func:`setup`'s rank of a process group of several, else a :class:`LocalContext` on
    ``device`` (``"auto"``: cuda when available)."""
    return setup(device) or LocalContext(resolve_device(device))


@dataclass
class DistContext(_Context):
    """One rank of a distributed evaluation: which batches it owns, where it writes, gathering."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    samples: set[int] = field(default_factory=set)  # global indices of the samples evaluated

    def owns(self, batch_number: int) -> bool:
        """Whether this rank evaluates the ``batch_number``-th batch of the single-process run."""
        return batch_number % self.world_size == self.rank

    def share(self, n_batches: int) -> int:
        """How many of ``n_batches`` batches this rank evaluates."""
        return len(range(self.rank, n_batches, self.world_size))

    def check_options(self, keep_adversarial: str | None) -> None:
        """Refuse the options a distributed run does not support yet."""
        if keep_adversarial is not None:
            raise ValueError("keep_adversarial= is not supported in a distributed run (torchrun) yet; "
                             "evaluate in one process to keep adversarial examples")

    def metadata(self) -> dict[str, Any]:
        """Fields the context adds to the run's metadata: the world size."""
        return {"world_size": self.world_size}

    def progress_note(self) -> str:
        """Only rank 0 shows progress; the note says it is one of several."""
        return f", rank {self.rank} of {self.world_size}"

    def batches(
        self, loader: DataLoader, limit: int | None, every: bool = False
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(global index of the first sample, x, y) of this rank's batches (``every``: of all
        batches), up to ``limit`` samples. Only this rank's batches are loaded when the sampler
        tells the batches apart; otherwise every batch is read and the others' skipped."""
        sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            raise ValueError(
                "the DataLoader shuffles without a generator, so each rank would see another "
                "order; pass shuffle=False (or a torch.Generator seeded the same on every rank)"
            )
        plan = _batch_plan(loader)
        if plan is None:
            for number, (start, x, y) in enumerate(numbered_batches(loader, limit)):
                if every or self.owns(number):
                    if not every:
                        self.samples.update(range(start, start + len(x)))
                    yield start, x, y
            return
        starts, start = [], 0
        for keys in plan:
            starts.append(start)
            start += len(keys)
        owned = [
            b for b in range(len(plan))
            if (every or self.owns(b)) and (limit is None or starts[b] < limit)
        ]
        sub = _subset_loader(loader, [plan[b] for b in owned])
        for start, x, y in numbered_batches(sub, limit, starts=[starts[b] for b in owned]):
            if not every:
                self.samples.update(range(start, start + len(x)))
            yield start, x, y

    def check_same(self, model: nn.Module, metadata: Mapping[str, Any]) -> None:
        """Raise on every rank if the ranks disagree on the model weights or the evaluation."""
        mine = {k: v for k, v in metadata.items() if k != "device"}
        if "fingerprint" not in mine:
            mine["fingerprint"] = {"model": _fingerprint(model)}
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=_gloo_group())
        for rank, theirs in enumerate(everyone):
            diff = sorted(k for k in set(mine) | set(theirs)
                          if k != "fingerprint" and mine.get(k) != theirs.get(k))
            diff += differences(mine["fingerprint"], theirs.get("fingerprint") or {})
            if diff and rank != self.rank:
                raise ValueError(
                    f"rank {self.rank} and rank {rank} differ in {', '.join(diff)}: every rank "
                    "must evaluate the same model (seed its initialisation or load the same "
                    "checkpoint on every rank), data, attacks and config"
                )

    def open_shard(
        self, path: str, metadata: Mapping[str, Any], resume: bool
    ) -> tuple[Results, ResultsWriter]:
        """This rank's shard of ``path`` (rows kept when resuming) and its writer.

        Resuming also reads the merged ``path`` and the shards of runs with another world size,
        so a run restarted on more or fewer ranks recomputes only rows nobody wrote.
        ``resume=False``: rank 0 deletes the merged file and those other shards.
        """
        check_target(path, "results", what="out=", hint="choose another out= path")
        if not resume and self.rank == 0:
            for f, _, world in shard_files(path):
                if world != self.world_size:
                    os.remove(check_target(f, "results", what="shard"))
            if os.path.exists(path):
                os.remove(path)
        own = shard_path(path, self.rank, self.world_size)
        results, writer = open_results_file(own, metadata, resume)
        if resume:
            others = [f for f, _, world in shard_files(path) if world != self.world_size]
            for f in ([path] if os.path.exists(path) else []) + others:
                results.extend(load_same_evaluation(f, metadata).rows)
        return results, writer

    def gather(self, results: Results, path: str | None) -> Results:
        """Rank 0: every rank's rows in one table (written to ``path`` if given). Other ranks:
        the rows of their own samples."""
        part = [r for r in results.rows if r["sample"] in self.samples]
        parts: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(part, parts, dst=0, group=_gloo_group())
        if self.rank != 0:
            return Results(part, {**results.metadata, "rank": self.rank})
        merged = Results(metadata=results.metadata)
        for rows in parts or []:
            merged.extend(rows)
        if path is not None:
            merged.save(path)
        return merged
