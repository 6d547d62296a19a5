"""AttriMeterEngine: torchreid's Engine training the interpreter of a frozen target (docs/method.md §4-5),
evaluating it with the explanation-aware evaluator, and saving checkpoints of the interpreter alone.

torchreid's loop (``run``/``train``, printing, TensorBoard) is reused as is; this subclass overrides
only ``forward_backward``, ``test``, ``save_model`` and the hooks whose torchreid versions would
unfreeze the target or lose finished epochs.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from yacs.config import CfgNode as CN

from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import attribute_places
from torchreid_attrimeter.checkpoints import (
    CheckpointWriter,
    ResumeError,
    attrimeter_record,
    read_checkpoint,
    verify_target,
)
from torchreid_attrimeter.config import (
    ConfigError,
    check_attrimeter_config,
    check_test_options,
    distance_metric,
    imagedata_kwargs,
    lr_scheduler_kwargs,
    optimizer_kwargs,
    target_name,
    target_weights,
)
from torchreid_attrimeter.data import (
    ATTRIBUTE_DATASETS,
    attribute_positive_ratios,
    attribute_schema_of,
    set_attribute_file,
)
from torchreid_attrimeter.decomposition import Decomposition, pairwise_components
from torchreid_attrimeter.evaluation import evaluate_model, format_table
from torchreid_attrimeter.feature_cache import CACHE_KEY, build_cached_train_loader, decompose_cached
from torchreid_attrimeter.losses import (
    AttributePriorLoss,
    DistanceDistillationLoss,
    PlacePriorLoss,
    WeightedAttributeBCE,
)
from torchreid_attrimeter.models import build_attrimeter

# --- random-number state, for resumed runs that equal uninterrupted ones -------------------------


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """torch Generators a training loader keeps across epochs (its own, its sampler's): they decide
    the next epoch's order or augmentation beside the global generators. None for torchreid's
    default loaders, one for the feature-cache loader (its flips)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not other for other in found):
            found.append(generator)
    return found


def capture_rng_state(loader: Any = None) -> dict:
    """Every random-number state that decides the next training epoch: python ``random`` and numpy
    (torchreid's RandomIdentitySampler), torch (RandomSampler, the DataLoader's per-epoch worker
    base seed, augmentation in the main process), CUDA, and the loader's own generators. Stored as
    tensors and plain numbers so that checkpoints keep loading with ``weights_only``."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "loader": [generator.get_state() for generator in _loader_generators(loader)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, loader: Any = None) -> None:
    """Put back what ``capture_rng_state`` recorded."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(value) for value in python["internal"].tolist()),
                     python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    generators = _loader_generators(loader)
    if len(generators) == len(state["loader"]):
        for generator, generator_state in zip(generators, state["loader"]):
            generator.set_state(generator_state)


def _parameter_holder(parameters: list[torch.nn.Parameter]) -> torch.nn.Module:
    """A module owning exactly the interpreter's parameters (the same tensors, not copies), because
    torchreid's build_optimizer takes a module and would otherwise hand the frozen target to it."""
    holder = torch.nn.Module()
    holder.interpreter = torch.nn.ParameterList(parameters)
    return holder


def build_optimizer(model: torch.nn.Module, cfg: CN) -> torch.optim.Optimizer:
    """torchreid's optimizer over the interpreter's parameters only."""
    if cfg.train.staged_lr:
        raise ConfigError(
            "train.staged_lr is True: AttriMeter trains only its interpreter, there are no base layers "
            "to slow down; set train.staged_lr False"
        )
    parameters = list(model.interpreter_parameters())
    if not parameters:
        raise ConfigError(f"the AttriMeter model around '{target_name(cfg)}' has no trainable parameters")
    return compat.build_optimizer(_parameter_holder(parameters), **optimizer_kwargs(cfg))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: CN) -> torch.optim.lr_scheduler.LRScheduler:
    """torchreid's scheduler (train.lr_scheduler), preceded by attrimeter.warmup_epochs of linear
    warm-up from attrimeter.warmup_factor x lr. Both are stepped per epoch; the chain saves and
    restores as one object."""
    scheduler = compat.build_lr_scheduler(optimizer, **lr_scheduler_kwargs(cfg))
    warmup_epochs = cfg.attrimeter.warmup_epochs
    if warmup_epochs <= 0:
        return scheduler
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=cfg.attrimeter.warmup_factor, end_factor=1.0, total_iters=warmup_epochs
    )
    return torch.optim.lr_scheduler.ChainedScheduler([warmup, scheduler])


class AttriMeterEngine(compat.Engine):
    """Trains an AttriMeter interpreter with torchreid's Engine loop.

    Args:
        datamanager: a torchreid ImageDataManager over a dataset with attributes
            (``market1501_attr``, ``dukemtmcreid_attr``, ``synthetic_attr``).
        model: the AttriMeter module (``build_attrimeter``); its target stays frozen.
        optimizer: holds the interpreter's parameters only (``build_optimizer``).
        scheduler: optional learning-rate scheduler.
        metric: 'euclidean' (plain) or 'cosine', the distance being split.
        weight_dd, weight_ap, weight_attr: loss weights (authors: 1, 10, 100).
        weight_place: weight of the spatial prior of placed attributes (``PlacePriorLoss``); 0 = off.
        evaluation: keyword arguments for ``evaluate_model`` (pairs, topk, memory_budget_mb, amp).
        trust_checkpoints: open checkpoints that need full unpickling.
        use_gpu: train on CUDA when available.
    """

    def __init__(
        self,
        datamanager,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        metric: str = "euclidean",
        weight_dd: float = 1.0,
        weight_ap: float = 10.0,
        weight_attr: float = 100.0,
        weight_place: float = 0.0,
        evaluation: dict | None = None,
        trust_checkpoints: bool = False,
        use_gpu: bool = True,
    ):
        super().__init__(datamanager, use_gpu=use_gpu)
        self.device = torch.device("cuda" if self.use_gpu else "cpu")
        self.schema = attribute_schema_of(datamanager)
        self.attribute_names = tuple(self.schema.attributes)
        self._check_model(model)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.register_model("model", self.model, optimizer, scheduler)
        self.metric = metric
        self._set_loss_weights(weight_dd, weight_ap, weight_attr, weight_place)
        self.evaluation = dict(evaluation or {})
        self.trust_checkpoints = trust_checkpoints
        self._build_losses(model, datamanager)
        self._init_run_state()
        self._freeze_target()

    # --- construction --------------------------------------------------------------------------------

    def _check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model that is not an AttriMeter, or one built for another number of attributes
        than the dataset's schema has: either would fail later, in the first step, less clearly."""
        if not hasattr(model, "interpreter_parameters") or not hasattr(model, "decompose"):
            raise TypeError(
                f"AttriMeterEngine trains an AttriMeter (torchreid_attrimeter.build_attrimeter), got "
                f"{type(model).__name__}"
            )
        if model.num_attributes != len(self.attribute_names):
            raise ValueError(
                f"the AttriMeter has {model.num_attributes} attributes but the dataset's schema "
                f"'{self.schema.name}' has {len(self.attribute_names)}: build it with num_attributes="
                f"{len(self.attribute_names)}"
            )

    def _set_loss_weights(self, weight_dd: float, weight_ap: float, weight_attr: float,
                          weight_place: float) -> None:
        """The loss weights, and the spatial prior of placed attributes when its weight is positive
        (None otherwise: ``forward_backward`` then skips that term)."""
        self.weight_dd, self.weight_ap = float(weight_dd), float(weight_ap)
        self.weight_attr = float(weight_attr)
        self.weight_place = float(weight_place)
        self.place_prior = None
        if self.weight_place > 0:
            self.place_prior = PlacePriorLoss(attribute_places(self.attribute_names)).to(self.device)

    def _build_losses(self, model: torch.nn.Module, datamanager) -> None:
        """The distillation and prior losses, and attribute recognition when the model has an
        attribute branch (weighted by the training set's positive ratios)."""
        self.distance_distillation = DistanceDistillationLoss()
        self.attribute_prior = AttributePriorLoss()
        self.attribute_recognition = None
        if getattr(model, "attribute_branch", None) is not None:
            self.attribute_recognition = WeightedAttributeBCE(attribute_positive_ratios(datamanager))
            self.attribute_recognition.to(self.device)

    def _init_run_state(self) -> None:
        """What a run records as it goes: results, checkpoints, random-number state, distribution."""
        self.test_results: dict[str, dict] = {}
        self.save_dir: str | None = None
        self.checkpoints = CheckpointWriter()
        # The checkpoint this run resumed from (None: a fresh run), and the one its results belong
        # to (the last one it wrote or, when it trained nothing, the one it loaded) with its epoch.
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self.last_checkpoint_epoch: int | None = None
        # Random-number state at the end of the last training epoch; put back before the next one,
        # so that evaluations in between, or an interruption and resume, do not change training.
        self.training_rng_state: dict | None = None
        # Under torchrun (distributed.make_engine_distributed): the DistributedDataParallel wrapper the
        # training steps go through, and the run's DistributedContext; one process: the model, None.
        self.training_model: torch.nn.Module = self.model
        self.distributed = None

    # --- the target stays frozen ------------------------------------------------------------------

    def _freeze_target(self) -> None:
        interpreter = {id(parameter) for parameter in self.model.interpreter_parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in interpreter)

    def two_stepped_transfer_learning(self, epoch, fixbase_epoch, open_layers, model=None):
        # torchreid's version calls open_all_layers(), which would make the frozen target trainable.
        # The interpreter has no pre-trained "base" to hold back, so fixbase_epoch does not apply.
        if fixbase_epoch > 0 and epoch == 0:
            print(f"* train.fixbase_epoch={fixbase_epoch} is ignored: only the interpreter trains, "
                  f"the target is always frozen")
        self._freeze_target()

    # --- training ---------------------------------------------------------------------------------

    def forward_backward(self, data: dict) -> dict[str, float]:
        """One PK batch: every pair (i != j) of the batch against itself.

        Returns floats that torchreid prints and writes to TensorBoard as ``Train/<key>``: the total
        loss, each term, and the batch's ADRE in % (the meter averages it over the epoch).
        """
        if "attributes" not in data or "attributes_known" not in data:
            raise ConfigError(
                f"training batches have no attributes (keys: {sorted(data)}): data.sources "
                f"{list(self.datamanager.sources)} must be attribute datasets such as "
                f"market1501_attr, dukemtmcreid_attr or synthetic_attr"
            )
        attributes = data["attributes"].to(self.device)
        attributes_known = data["attributes_known"].to(self.device)

        if CACHE_KEY in data:  # attrimeter.cache_target_features: the frozen target's part is cached
            decomposition: Decomposition = decompose_cached(self.model, data[CACHE_KEY], self.device)
        else:
            decomposition = self.training_model(data["img"].to(self.device))
        distances = pairwise_components(decomposition, decomposition, self.metric)
        loss_dd = self.distance_distillation(distances)
        loss_ap = self.attribute_prior(distances, attributes, attributes_known)
        loss = self.weight_dd * loss_dd + self.weight_ap * loss_ap
        summary = {"loss_dd": loss_dd.item(), "loss_ap": loss_ap.item()}
        if self.attribute_recognition is not None:
            loss_attr = self.attribute_recognition(decomposition.attribute_logits, attributes,
                                                   attributes_known)
            loss = loss + self.weight_attr * loss_attr
            summary["loss_attr"] = loss_attr.item()
        if self.place_prior is not None:
            loss_place = self.place_prior(decomposition.maps)
            loss = loss + self.weight_place * loss_place
            summary["loss_place"] = loss_place.item()

        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

        summary["loss"] = loss.item()
        summary["ADRE"] = batch_adre(distances.target_distance.detach(),
                                     distances.reconstructed_distance.detach())
        if self.distributed is not None:  # rank 0 prints and logs the mean over all ranks
            summary = self.distributed.average_floats(summary)
        return summary

    def run(self, save_dir: str = "log", max_epoch: int = 0, start_epoch: int = 0, test_only: bool = False,
            **kwargs) -> None:
        """torchreid's ``run``, plus a checkpoint after every epoch and a refusal to train in a
        ``save_dir`` holding another run's checkpoints (one folder, one run: ``--evaluate`` and
        ``--resume auto`` take the folder's latest checkpoint)."""
        self.save_dir = save_dir
        if not test_only:
            if self.resumed_from is None and start_epoch >= max_epoch:
                raise ConfigError(
                    f"train.start_epoch is {start_epoch} and train.max_epoch {max_epoch}: a new run would "
                    f"train nothing and evaluate an untrained interpreter. Set train.max_epoch above "
                    f"train.start_epoch, or evaluate a trained one with --evaluate (test.evaluate True)"
                )
            if self.resumed_from is not None and start_epoch >= max_epoch > 0:
                # torchreid would "finish" with self.epoch = 0 and save epoch 1 over a real checkpoint.
                print(f"=> Already trained to epoch {start_epoch} of {max_epoch}: evaluating only")
                test_only = True
            else:
                self._on_main_process(self.checkpoints.check_folder, save_dir, start_epoch, self.resumed_from,
                                      what="checking data.save_dir")
        super().run(save_dir=save_dir, max_epoch=max_epoch, start_epoch=start_epoch, test_only=test_only,
                    **kwargs)

    def train(self, print_freq: int = 10, fixbase_epoch: int = 0, open_layers=None) -> None:
        # Under torchrun each rank has its own (seed + rank) streams and the samplers draw from
        # (seed, epoch): only a single process keeps and restores the global state.
        single_process = self.distributed is None
        if single_process and self.training_rng_state is not None:
            restore_rng_state(self.training_rng_state, self.train_loader)
        if self.distributed is not None:
            self.distributed.start_epoch(self.epoch)
        super().train(print_freq=print_freq, fixbase_epoch=fixbase_epoch, open_layers=open_layers)
        if self.distributed is not None:
            self.distributed.end_epoch(self.model)
        self.training_rng_state = capture_rng_state(self.train_loader) if single_process else None
        # torchreid saves only after an evaluation; an interrupted run must not lose finished epochs.
        if self.save_dir is not None:
            self.save_model(self.epoch, None, self.save_dir)

    # --- evaluation -------------------------------------------------------------------------------

    def _on_main_process(self, function, *args, what: str = "", **kwargs):
        """``function`` here (one process), or on rank 0 only with its result shared (torchrun)."""
        if self.distributed is None:
            return function(*args, **kwargs)
        return self.distributed.on_main_process(function, *args, what=what, **kwargs)

    def test(self, *args, **kwargs) -> float:
        """``evaluate_here``; under torchrun on rank 0 only (the explanation metrics need every
        query x gallery pair in one place), the other ranks wait and get its rank-1."""
        return self._on_main_process(self.evaluate_here, *args, what="evaluating", **kwargs)

    def evaluate_here(self, dist_metric: str = "euclidean", normalize_feature: bool = False,
                      visrank: bool = False, visrank_topk: int = 10, save_dir: str = "",
                      use_metric_cuhk03: bool = False, ranks=(1, 5, 10, 20), rerank: bool = False) -> float:
        """Explanation-aware evaluation on every target dataset; returns the interpreter's rank-1
        (a fraction, as torchreid's test does) of the last one, for ``run`` to store in checkpoints."""
        check_test_options(normalize_feature=normalize_feature, rerank=rerank, visrank=visrank,
                           use_metric_cuhk03=use_metric_cuhk03)
        self.set_model_mode("eval")
        rank1 = 0.0
        for name in self.test_loader:
            print(f"##### Evaluating {name} with AttriMeter ({self.metric} distance) #####")
            results = evaluate_model(
                self.model,
                self.test_loader[name]["query"],
                self.test_loader[name]["gallery"],
                self.attribute_names,
                metric=self.metric,
                ranks=tuple(ranks),
                device=self.device,
                **self.evaluation,
            )
            print(format_table(results))
            self.test_results[name] = results
            if self.writer is not None:
                for key, value in results.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.writer.add_scalar(f"Test/{name}/{key}", value, self.epoch)
            # In 'topk' pair mode the interpreter does not rank whole galleries: report the target's.
            rank1_percent = results.get("interpreter_rank1")
            if rank1_percent is None:
                rank1_percent = results.get("target_rank1") or 0.0
            rank1 = float(rank1_percent) / 100.0
        return rank1

    # --- checkpoints ------------------------------------------------------------------------------

    def checkpoint_state(self, epoch: int, rank1: float | None) -> dict:
        """What a checkpoint holds: the interpreter's weights only, and what identifies the target."""
        state = {
            "state_dict": self.model.interpreter_state_dict(),
            "epoch": epoch + 1,
            "optimizer": self.optimizer.state_dict(),
            "attrimeter": attrimeter_record(self.model.target_spec, self.attribute_names, self.schema.name,
                                            self.metric),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if rank1 is not None:
            # torchreid stores cmc[0], a numpy scalar that torch >= 2.6 refuses to load safely.
            state["rank1"] = float(rank1)
        if self.training_rng_state is not None:
            state["rng"] = self.training_rng_state
        return state

    def save_model(self, epoch: int, rank1: float | None, save_dir: str, is_best: bool = False) -> str:
        """Write ``<save_dir>/model/model.pth.tar-<epoch+1>`` (``CheckpointWriter.save``; torchreid's
        crashes without a scheduler); under torchrun on rank 0 only. A checkpoint of an epoch without
        evaluation (rank1 None) is replaced by the next one."""
        def write() -> str:  # the state too is gathered on rank 0 only
            return self.checkpoints.save(save_dir, epoch + 1, self.checkpoint_state(epoch, rank1),
                                         rolling=rank1 is None, is_best=is_best)

        path = self._on_main_process(write, what=f"saving the checkpoint of epoch {epoch + 1}")
        self.last_checkpoint, self.last_checkpoint_epoch = path, epoch + 1
        return path

    def resume(self, path: str) -> int:
        """Load an interpreter checkpoint (weights, optimizer, scheduler); returns the epoch to start
        from. The checkpoint must have been trained for the same target weights and attributes."""
        checkpoint, record = read_checkpoint(
            path, trusted=self.trust_checkpoints, error=ResumeError,
            fix="to explain a target from this file, give it as attrimeter.target_weights, not as model.resume")
        if "attribute_probe" in checkpoint:
            # Written by versions with the keep / remove probe: its optimizer state covers the probe's
            # classifier too, and the run's loss cannot be continued without it.
            raise ResumeError(
                f"'{path}' was trained with the keep / remove attribute probe (attrimeter.weight_probe), which "
                f"was removed: it did not improve the explanations (docs/results.md). Its losses cannot "
                f"continue: start a new data.save_dir. The checkpoint still explains "
                f"(Explainer.from_checkpoint, tools/visualize_decomposition.py).")
        spec = self.model.target_spec
        verify_target(path, record["target"], spec.get("weights"), name=spec.get("name"),
                      weights_sha256=spec.get("weights_sha256"), error=ResumeError,
                      fix="use the target it was trained for (attrimeter.target_name / model.name, "
                          "attrimeter.target_weights / model.load_weights) or start a new data.save_dir")
        if list(record["attribute_names"]) != list(self.attribute_names):
            raise ResumeError(
                f"'{path}' was trained on the attributes {record['attribute_names']} (schema "
                f"'{record['schema']}'), but the dataset gives {list(self.attribute_names)}: resume with "
                f"the same dataset schema or start a new data.save_dir"
            )
        if record["metric"] != self.metric:
            raise ResumeError(
                f"'{path}' was trained to split the {record['metric']} distance, the config asks for "
                f"{self.metric} (attrimeter.metric / test.dist_metric): use the same metric"
            )
        try:
            self.model.load_interpreter_state_dict(checkpoint["state_dict"])
        except (ValueError, RuntimeError) as error:
            raise ResumeError(
                f"'{path}' holds an interpreter of another shape (attrimeter.variant / hidden_channels / "
                f"attribute_branch differ from the config): {str(error).splitlines()[0]}"
            ) from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and "scheduler" in checkpoint:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        epoch = int(checkpoint["epoch"])
        print(f'Resumed from "{path}": epoch {epoch}'
              + (f", rank1 {checkpoint['rank1']:.1%}" if "rank1" in checkpoint else ""))
        if isinstance(checkpoint.get("rng"), dict):
            self.training_rng_state = checkpoint["rng"]
        else:
            print(f"=> '{path}' holds no random-number state (written before it was saved, or under "
                  f"torchrun): training continues from it, but not bit for bit as the uninterrupted "
                  f"run would have")
        self.resumed_from = path
        self.last_checkpoint, self.last_checkpoint_epoch = path, epoch
        return epoch


def batch_adre(target_distance: torch.Tensor, reconstructed_distance: torch.Tensor) -> float:
    """ADRE (docs/method.md §6) over the off-diagonal pairs of a training batch, in %.

    target_distance, reconstructed_distance: (B, B).
    """
    batch = target_distance.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=target_distance.device)
    target = target_distance[off_diagonal]
    valid = target > 1e-8
    if not bool(valid.any()):
        return 0.0
    relative = (target[valid] - reconstructed_distance[off_diagonal][valid]).abs() / target[valid]
    return float(relative.mean()) * 100.0


def check_attribute_datasets(cfg: CN) -> None:
    """Every source and target must be an attribute dataset (torchreid's own would even try to
    download themselves), and attrimeter.attribute_file must say which dataset it labels."""
    for key, names in (("data.sources", cfg.data.sources), ("data.targets", cfg.data.targets)):
        for name in names:
            if name not in ATTRIBUTE_DATASETS:
                with_attributes = f"{name}_attr" if f"{name}_attr" in ATTRIBUTE_DATASETS else None
                hint = f"use '{with_attributes}' instead" if with_attributes else (
                    f"use one of {', '.join(ATTRIBUTE_DATASETS)}")
                raise ConfigError(
                    f"{key} contains '{name}', a dataset without attribute labels, which the AttriMeter "
                    f"engine needs: {hint}"
                )
    attribute_file = cfg.attrimeter.attribute_file
    if attribute_file:
        used = sorted(set(cfg.data.sources) | set(cfg.data.targets))
        if len(used) != 1:
            raise ConfigError(
                f"attrimeter.attribute_file gives one file, but data.sources / data.targets use {used}: "
                f"leave it empty and put each dataset's attribute file in its dataset folder (or set "
                f"the ATTRIMETER_<DATASET>_ATTRIBUTES environment variables)"
            )
        if not os.path.isfile(attribute_file):
            raise ConfigError(f"attrimeter.attribute_file: file not found: '{attribute_file}'")
        set_attribute_file(used[0], attribute_file)


def count_training_identities(cfg: CN) -> int:
    """Identities of the training set ImageDataManager builds from data.sources (torchreid keeps
    each source's identities apart when it merges them)."""
    datasets = compat.torchreid_submodule("data.datasets")
    total = 0
    for name in cfg.data.sources:
        dataset = datasets.init_image_dataset(
            name, transform=None, mode="train", combineall=cfg.data.combineall, root=cfg.data.root,
            split_id=cfg.data.split_id, cuhk03_labeled=cfg.cuhk03.labeled_images,
            cuhk03_classic_split=cfg.cuhk03.classic_split, market1501_500k=cfg.market1501.use_500k_distractors,
            verbose=False)
        total += dataset.num_train_pids
    return total


def build_datamanager(cfg: CN):
    """torchreid's ImageDataManager, with the bare AssertionError of its RandomIdentitySampler (a
    batch asking for more identities than the training set has) turned into a ConfigError."""
    try:
        return compat.ImageDataManager(**imagedata_kwargs(cfg))
    except AssertionError:
        if cfg.sampler.train_sampler != "RandomIdentitySampler":
            raise
        # Counted only now: reading the dataset twice would slow every correct run down.
        identities = count_training_identities(cfg)
        batch_size, num_instances = cfg.train.batch_size, cfg.sampler.num_instances
        wanted = batch_size // num_instances
        if wanted <= identities:
            raise
        largest = identities * num_instances
        fix = (f"use train.batch_size <= {largest} ({identities} identities x {num_instances} images), "
               f"or a smaller sampler.num_instances" if identities >= 2 else
               "the RandomIdentitySampler needs at least 2 training identities: add data")
        raise ConfigError(
            f"train.batch_size={batch_size} with sampler.num_instances={num_instances} asks for {wanted} "
            f"identities per batch, but the training set (data.sources {list(cfg.data.sources)}) has "
            f"{identities} identities: {fix}"
        ) from None


def _checked_num_attributes(cfg: CN, datamanager) -> int:
    """The number of attributes the interpreter explains: the data's schema's, after checking that
    attrimeter.num_attributes and attrimeter.schema, when set, agree with it."""
    try:
        schema = attribute_schema_of(datamanager)
    except TypeError as error:
        raise ConfigError(f"data.sources: {error}") from None
    num_attributes = cfg.attrimeter.num_attributes or schema.num_attributes
    if num_attributes != schema.num_attributes:
        raise ConfigError(
            f"attrimeter.num_attributes is {num_attributes} but the dataset's schema '{schema.name}' has "
            f"{schema.num_attributes} attributes: set attrimeter.num_attributes 0 (= from the schema)"
        )
    if cfg.attrimeter.schema and cfg.attrimeter.schema != schema.name:
        raise ConfigError(
            f"attrimeter.schema is '{cfg.attrimeter.schema}' but data.sources {list(cfg.data.sources)} use "
            f"the schema '{schema.name}': leave attrimeter.schema empty or pick matching datasets"
        )
    return num_attributes


def _build_model(cfg: CN, num_attributes: int) -> torch.nn.Module:
    """The AttriMeter model around the configured target, with a missing or mismatched target named
    as a ConfigError that says which option to change."""
    name, weights = target_name(cfg), target_weights(cfg)
    if name not in compat.available_model_names():
        raise ConfigError(
            f"target model '{name}' (attrimeter.target_name / model.name) is not a torchreid model name; "
            f"available: {', '.join(compat.available_model_names())}"
        )
    if not os.path.isfile(weights):
        raise ConfigError(
            f"target weights file not found: '{weights}' (attrimeter.target_weights / model.load_weights)"
        )
    print(f"Building target: {name} (weights {weights})")
    try:
        return build_attrimeter(
            name,
            num_attributes,
            target_weights=weights,
            variant=cfg.attrimeter.variant,
            hidden_channels=cfg.attrimeter.hidden_channels,
            attribute_branch=cfg.attrimeter.attribute_branch,
            image_size=(cfg.data.height, cfg.data.width),
            trusted=cfg.attrimeter.trust_checkpoints,
        )
    except compat.UnreadableCheckpointError as error:
        raise ConfigError(
            f"target weights (attrimeter.target_weights / model.load_weights): {error}"
        ) from None
    except compat.CheckpointError as error:
        raise ConfigError(
            f"the target weights do not fit the target model '{name}': {error}. Set attrimeter.target_name "
            f"(or model.name) to the architecture '{weights}' was trained with, or give that model's "
            f"weights (attrimeter.target_weights / model.load_weights)"
        ) from None


def _evaluation_options(cfg: CN) -> dict:
    """Keyword arguments of ``evaluate_model`` from attrimeter.eval."""
    return {
        "pairs": cfg.attrimeter.eval.pairs,
        "topk": cfg.attrimeter.eval.topk,
        "memory_budget_mb": cfg.attrimeter.eval.memory_budget_mb,
        "amp": cfg.attrimeter.eval.amp,
    }


def build_engine(cfg: CN, datamanager=None) -> AttriMeterEngine:
    """Data manager, target, AttriMeter model, optimizer, scheduler and engine from a config, the way
    torchreid's scripts/main.py builds its engine."""

    check_attrimeter_config(cfg)
    if datamanager is None:
        check_attribute_datasets(cfg)
        datamanager = build_datamanager(cfg)
    model = _build_model(cfg, _checked_num_attributes(cfg, datamanager))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    engine = AttriMeterEngine(
        datamanager,
        model,
        optimizer,
        scheduler,
        metric=distance_metric(cfg),
        weight_dd=cfg.attrimeter.weight_dd,
        weight_ap=cfg.attrimeter.weight_ap,
        weight_attr=cfg.attrimeter.weight_attr,
        weight_place=cfg.attrimeter.weight_place,
        evaluation=_evaluation_options(cfg),
        trust_checkpoints=cfg.attrimeter.trust_checkpoints,
        use_gpu=cfg.use_gpu,
    )
    if cfg.attrimeter.cache_target_features and not cfg.test.evaluate:
        # Replaces the image loader (same sampler and batch size): steps then cost only the interpreter.
        engine.train_loader = build_cached_train_loader(
            engine.model, datamanager, cfg.data.transforms, cfg.data.k_tfm, cfg.train.batch_size,
            workers=cfg.data.workers, seed=cfg.train.seed)
    return engine
