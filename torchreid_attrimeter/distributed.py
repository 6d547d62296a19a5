"""Training with ``DistributedDataParallel`` when ``tools/train.py`` is started by ``torchrun``.

One process per device (NCCL on CUDA, gloo on CPU). What each part does:

- ``train.batch_size`` is the GLOBAL batch: P x K images over all processes. Each process trains on
  (P / world_size) x K of them, its own identities (``DistributedIdentitySampler``). DDP averages the
  processes' gradients, so one step sees the same number of images as a single-process run with the
  same config, and ``train.lr`` needs no change when the number of processes changes.
- Evaluation and checkpoints run on rank 0 only (``DistributedContext.on_main_process``): the
  explanation metrics (X-mAP, ADRE) need every query x gallery pair with its M components in one
  place, so a sharded gallery would have to be gathered again anyway (M x D floats per image).
  The other ranks wait on a gloo group with its own, longer timeout
  (``attrimeter.distributed.main_process_timeout_minutes``) and fail with rank 0's error if it fails.
- Failures: every step that can fail on one rank only (building the engine, reading a checkpoint) is
  followed by ``agree``, so every rank stops with a message naming the failing rank; a rank that dies
  in the middle of a step makes the others fail after ``attrimeter.distributed.timeout_minutes``
  (torchrun usually stops them sooner).
"""

from __future__ import annotations

import datetime
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from yacs.config import CfgNode as CN

from torchreid_attrimeter.config import ConfigError
from torchreid_attrimeter.errors import AttriMeterError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# torchreid samplers and how they run in several processes; the others pick batches by camera or
# source dataset over the whole training set and have no per-process version.
DISTRIBUTED_SAMPLERS = ("RandomIdentitySampler", "RandomSampler", "SequentialSampler")


class DistributedError(AttriMeterError, RuntimeError):
    """Another process of a distributed run failed; this one stops too."""


def launched_by_torchrun(environ: dict | None = None) -> bool:
    """True when torchrun (or another launcher setting its variables) started this process."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in TORCHRUN_VARIABLES)


def check_distributed_config(cfg: CN, world_size: int) -> None:
    """The batch and sampler must split into world_size equal per-process batches."""
    sampler, batch_size = cfg.sampler.train_sampler, cfg.train.batch_size
    if sampler not in DISTRIBUTED_SAMPLERS:
        raise ConfigError(
            f"sampler.train_sampler '{sampler}' cannot be split over {world_size} processes (it draws "
            f"batches by camera or dataset over the whole training set): use RandomIdentitySampler "
            f"(P x K batches) or RandomSampler under torchrun"
        )
    if sampler == "RandomIdentitySampler":
        num_instances = cfg.sampler.num_instances
        identities = batch_size // num_instances
        if identities % world_size or identities // world_size < 2:
            per_process = 2 * world_size
            raise ConfigError(
                f"train.batch_size={batch_size} is the global batch of P={identities} identities x "
                f"K={num_instances} images (sampler.num_instances), which cannot be split over "
                f"{world_size} processes: P must be a multiple of the world size with at least 2 "
                f"identities per process. Use e.g. train.batch_size {per_process * num_instances} "
                f"(or a multiple of it), or another --nproc_per_node"
            )
    elif batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch, which cannot be split over {world_size} "
            f"processes: use a multiple of {world_size}, e.g. train.batch_size "
            f"{max(1, round(batch_size / world_size)) * world_size}"
        )
    if cfg.attrimeter.cache_target_features:
        raise ConfigError(
            "attrimeter.cache_target_features is True: the cached-feature training loader and step "
            "bypass DistributedDataParallel; set it False for torchrun runs"
        )
    node = cfg.attrimeter.distributed
    for key in ("timeout_minutes", "main_process_timeout_minutes"):
        if node[key] <= 0:
            raise ConfigError(f"attrimeter.distributed.{key} is {node[key]}: it must be > 0 (minutes)")


@dataclass
class DistributedContext:
    """This process's place in a torchrun job and the collectives the engine and tool need."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    control_group: Any  # gloo group with the long timeout: waits for rank 0, exchanges errors
    train_sampler: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_main_process(self, function: Callable, *args, what: str = "", **kwargs) -> Any:
        """Run ``function`` on rank 0 only; every rank returns its (picklable) result, or raises:
        rank 0 its own error, the others a DistributedError carrying that error's message."""
        outcome: list[Any] = [None]
        local_error: BaseException | None = None
        if self.is_main:
            try:
                outcome = [("ok", function(*args, **kwargs))]
            except BaseException as error:  # noqa: BLE001 - every failure must reach the other ranks
                local_error = error
                outcome = [("error", f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(outcome, src=0, group=self.control_group)
        status, payload = outcome[0]
        if status == "error":
            if local_error is not None:
                raise local_error
            raise DistributedError(
                f"rank 0 failed{' while ' + what if what else ''}: {payload} (rank {self.rank} stops too)"
            )
        return payload

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank reports whether ``what`` worked on it; if any failed, every rank raises (the
        failing ones their own error, the others a DistributedError naming them)."""
        reports: list[Any] = [None] * self.world_size
        message = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, message, group=self.control_group)
        if error is not None:
            raise error
        failures = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if failures:
            details = "; ".join(f"rank {rank}: {report}" for rank, report in failures)
            raise DistributedError(f"{what} failed on another process ({details}); rank {self.rank} stops too")

    def average_floats(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over the ranks of each value (same keys on every rank), for printing and logs."""
        keys = sorted(values)
        tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        tensor /= self.world_size
        return dict(zip(keys, tensor.tolist()))

    def start_epoch(self, epoch: int) -> None:
        """Every rank draws the same epoch plan (its own share of it), different from other epochs."""
        if hasattr(self.train_sampler, "set_epoch"):
            self.train_sampler.set_epoch(epoch)

    def end_epoch(self, model: torch.nn.Module) -> None:
        """Average the interpreter's floating-point buffers (BatchNorm running statistics, updated
        from each rank's own batches) so that every rank evaluates and saves the same model."""
        interpreter_keys = set(model.interpreter_state_dict())
        for name, buffer in model.named_buffers():
            if name in interpreter_keys and buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world_size

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(cfg: CN) -> DistributedContext | None:
    """Join the torchrun job this process belongs to (None when not started by torchrun).

    The process group's timeout (attrimeter.distributed.timeout_minutes) bounds every collective of a
    training step, so a crashed peer makes the others fail instead of hanging.
    """
    if not launched_by_torchrun():
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    check_distributed_config(cfg, world_size)
    node = cfg.attrimeter.distributed
    if cfg.use_gpu and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA devices: "
                f"start at most that many processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=node.timeout_minutes))
    control_group = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(minutes=node.main_process_timeout_minutes)
    )
    return DistributedContext(rank, world_size, local_rank, backend, device, control_group)


class DistributedIdentitySampler(Sampler[int]):
    """P x K batches split over the processes by identity.

    Every epoch all ranks draw the same plan from (seed, epoch): each identity's images are shuffled
    and cut into groups of K (an identity with fewer than K images is drawn with replacement, as
    torchreid's RandomIdentitySampler does), and global batches of P identities are drawn until fewer
    than P identities have groups left. Rank r takes identities r*P/N .. (r+1)*P/N - 1 of each global
    batch, so at every step the processes see different identities, every group is used once per
    epoch, and all ranks get the same number of batches.

    Args:
        data_source: torchreid's training list of (impath, pid, camid, dsetid) tuples.
        batch_size: the global batch, P x K.
        num_instances: K.
        rank, world_size: this process and the number of processes.
        seed: the run's seed (train.seed).
    """

    def __init__(self, data_source: Sequence, batch_size: int, num_instances: int, rank: int,
                 world_size: int, seed: int = 0):
        if num_instances < 1 or batch_size % num_instances:
            raise ConfigError(
                f"train.batch_size={batch_size} must be a multiple of sampler.num_instances={num_instances}"
            )
        identities = batch_size // num_instances
        if identities % world_size or not 0 <= rank < world_size:
            raise ConfigError(
                f"{identities} identities per batch cannot be split over {world_size} processes "
                f"(rank {rank}): P must be a multiple of the world size"
            )
        self.index_by_pid: dict[int, list[int]] = defaultdict(list)
        for index, items in enumerate(data_source):
            self.index_by_pid[int(items[1])].append(index)
        self.pids = sorted(self.index_by_pid)
        if len(self.pids) < identities:
            raise ConfigError(
                f"the training set has {len(self.pids)} identities, fewer than the P={identities} a batch "
                f"needs (train.batch_size / sampler.num_instances): use a smaller train.batch_size"
            )
        self.num_instances = num_instances
        self.identities_per_batch = identities
        self.identities_per_process = identities // world_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[list[int]]]:
        """The epoch's plan: global batches, each a list of P groups of K dataset indices."""
        rng = random.Random(f"{self.seed}:{self.epoch}")
        groups_by_pid: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            indices = list(self.index_by_pid[pid])
            if len(indices) < self.num_instances:
                indices = rng.choices(indices, k=self.num_instances)
            rng.shuffle(indices)
            usable = len(indices) - len(indices) % self.num_instances
            groups_by_pid[pid] = [indices[start:start + self.num_instances]
                                  for start in range(0, usable, self.num_instances)]
        available = list(self.pids)
        batches = []
        while len(available) >= self.identities_per_batch:
            selected = rng.sample(available, self.identities_per_batch)
            batches.append([groups_by_pid[pid].pop(0) for pid in selected])
            available = [pid for pid in available if groups_by_pid[pid]]
        return batches

    def _indices(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            first = self.rank * self.identities_per_process
            indices = [index for batch in self.global_batches()
                       for group in batch[first:first + self.identities_per_process] for index in group]
            self._cache = (self.epoch, indices)
        return self._cache[1]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def distributed_train_loader(loader: DataLoader, cfg: CN, context: DistributedContext) -> DataLoader:
    """torchreid's training loader rebuilt for one process: the same dataset and workers, this rank's
    share of each global batch."""
    name, batch_size = cfg.sampler.train_sampler, cfg.train.batch_size
    dataset = loader.dataset
    if name == "RandomIdentitySampler":
        sampler: Sampler = DistributedIdentitySampler(
            dataset.train, batch_size, cfg.sampler.num_instances, context.rank, context.world_size,
            seed=cfg.train.seed,
        )
    elif name in ("RandomSampler", "SequentialSampler"):
        sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                     shuffle=name == "RandomSampler", seed=cfg.train.seed, drop_last=True)
    else:
        check_distributed_config(cfg, context.world_size)  # raises the explanation
        raise AssertionError(name)
    context.train_sampler = sampler
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size // context.world_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        drop_last=True,
    )


class _SilentWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0 (torchreid's Engine creates
    one when it has none)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine_distributed(engine: Any, cfg: CN, context: DistributedContext) -> None:
    """Give an AttriMeterEngine its per-process loader, a DDP wrapper for training steps and, on
    ranks other than 0, no TensorBoard writer. Call after resuming (every rank loads the checkpoint)."""
    engine.train_loader = distributed_train_loader(engine.train_loader, cfg, context)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # broadcast_buffers=False: BN running statistics are averaged once per epoch (end_epoch) instead
    # of being overwritten with rank 0's at every step.
    engine.training_model = torch.nn.parallel.DistributedDataParallel(
        engine.model, device_ids=device_ids, broadcast_buffers=False
    )
    engine.distributed = context
    if not context.is_main:
        engine.writer = _SilentWriter()


def run_on_every_rank(context: DistributedContext | None, function: Callable, *args, what: str) -> Any:
    """``function(*args)`` on every rank; if it fails on any, it fails on all (see ``agree``)."""
    if context is None:
        return function(*args)
    result, failure = None, None
    try:
        result = function(*args)
    except Exception as error:  # noqa: BLE001 - reported to every rank, then raised again
        failure = error
    context.agree(failure, what)
    return result


def on_main_process(context: DistributedContext | None, function: Callable, *args, what: str) -> Any:
    """``function(*args)`` here (one process) or on rank 0 only, its result shared (torchrun)."""
    if context is None:
        return function(*args)
    return context.on_main_process(function, *args, what=what)
