"""yacs configuration: every key of torchreid's ``scripts/default_config.py`` (same defaults) plus an
``attrimeter`` node, and the helpers that turn a config into keyword arguments for torchreid.

torchreid's default config is not part of its PyPI package, so it is reproduced here key for key: a
YAML file written for torchreid's ``scripts/main.py`` loads unchanged, and the AttriMeter options
are added under ``attrimeter``.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable
from typing import Any

import torch
from yacs.config import CfgNode as CN

from torchreid_attrimeter import compat
from torchreid_attrimeter.decomposition import METRICS
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.evaluation.evaluator import PAIR_MODES
from torchreid_attrimeter.feature_cache import FeatureCacheError, check_cacheable_transforms
from torchreid_attrimeter.models.attrimeter import VARIANTS

# Named training recipes: attrimeter keys and the values each preset gives them. A config that sets
# one of these keys to another value than its preset's is an error (which one would the user mean?).
# 'paper': the authors' interpreter losses L_dd + L_ap as this project reproduces them.
# 'localised': the authors' attribute-recognition branch (L_attr, attrimeter.weight_attr) plus this
# package's place prior, which moves the maps of attributes with a fixed place (docs/results.md).
PRESETS = {
    "paper": {"attribute_branch": False, "weight_place": 0.0},
    "localised": {"attribute_branch": True, "weight_place": 5.0},
}
# Keys earlier versions accepted and this one no longer has, with why: a config still setting one
# gets this reason and the fix instead of a bare "unknown key".
REMOVED_KEYS = {
    key: "the keep / remove attribute probe was removed because it did not improve the explanations "
         "(docs/results.md, 'Training signals beyond the paper')"
    for key in ("attrimeter.weight_probe", "attrimeter.weight_probe_remove")
}
# torchreid's test options the AttriMeter engine refuses, and why: the configuration check and the
# engine's evaluation (which also takes them as arguments) both refuse them with these words.
UNSUPPORTED_TEST_OPTIONS = {
    "test.normalize_feature": "AttriMeter splits the distance of the target's own embeddings (for distances "
                              "between normalised features set test.dist_metric 'cosine')",
    "test.rerank": "re-ranking replaces the distances AttriMeter explains",
    "test.visrank": "the AttriMeter engine does not draw torchreid's ranked lists",
    "cuhk03.use_metric_cuhk03": "CUHK03 has no attribute labels, so the AttriMeter engine never evaluates on it",
}


class ConfigError(AttriMeterError, ValueError):
    """A configuration key or value that cannot be used; the message names the key and the fix."""


def get_default_config() -> CN:
    """torchreid's default configuration (scripts/default_config.py of torchreid 1.4.0) plus the
    ``attrimeter`` node."""
    cfg = CN()
    # main.py sets this after building the defaults; kept as a key so YAML files may set it too.
    cfg.use_gpu = torch.cuda.is_available()

    # model
    cfg.model = CN()
    cfg.model.name = "resnet50"
    cfg.model.pretrained = True  # load ImageNet weights (downloads): AttriMeter targets never need it
    cfg.model.load_weights = ""  # path to model weights; for AttriMeter, the target's weights
    cfg.model.resume = ""  # checkpoint to resume from; AttriMeter also accepts 'auto'

    # data
    cfg.data = CN()
    cfg.data.type = "image"
    cfg.data.root = "reid-data"
    cfg.data.sources = ["market1501"]
    cfg.data.targets = ["market1501"]
    cfg.data.workers = 4
    cfg.data.split_id = 0
    cfg.data.height = 256
    cfg.data.width = 128
    cfg.data.combineall = False
    cfg.data.transforms = ["random_flip"]
    cfg.data.k_tfm = 1
    cfg.data.norm_mean = [0.485, 0.456, 0.406]
    cfg.data.norm_std = [0.229, 0.224, 0.225]
    cfg.data.save_dir = "log"
    cfg.data.load_train_targets = False

    # specific datasets
    cfg.market1501 = CN()
    cfg.market1501.use_500k_distractors = False
    cfg.cuhk03 = CN()
    cfg.cuhk03.labeled_images = False
    cfg.cuhk03.classic_split = False
    cfg.cuhk03.use_metric_cuhk03 = False

    # sampler
    cfg.sampler = CN()
    cfg.sampler.train_sampler = "RandomSampler"
    cfg.sampler.train_sampler_t = "RandomSampler"
    cfg.sampler.num_instances = 4
    cfg.sampler.num_cams = 1
    cfg.sampler.num_datasets = 1

    # video reid
    cfg.video = CN()
    cfg.video.seq_len = 15
    cfg.video.sample_method = "evenly"
    cfg.video.pooling_method = "avg"

    # train
    cfg.train = CN()
    cfg.train.optim = "adam"
    cfg.train.lr = 0.0003
    cfg.train.weight_decay = 5e-4
    cfg.train.max_epoch = 60
    cfg.train.start_epoch = 0
    # The GLOBAL batch: under torchrun each of the N processes trains on batch_size / N images
    # (P / N identities x K), so the effective batch is batch_size whatever N is.
    cfg.train.batch_size = 32
    cfg.train.fixbase_epoch = 0
    cfg.train.open_layers = ["classifier"]
    cfg.train.staged_lr = False
    cfg.train.new_layers = ["classifier"]
    cfg.train.base_lr_mult = 0.1
    cfg.train.lr_scheduler = "single_step"
    cfg.train.stepsize = [20]
    cfg.train.gamma = 0.1
    cfg.train.print_freq = 20
    cfg.train.seed = 1

    # optimizers
    cfg.sgd = CN()
    cfg.sgd.momentum = 0.9
    cfg.sgd.dampening = 0.0
    cfg.sgd.nesterov = False
    cfg.rmsprop = CN()
    cfg.rmsprop.alpha = 0.99
    cfg.adam = CN()
    cfg.adam.beta1 = 0.9
    cfg.adam.beta2 = 0.999

    # loss
    cfg.loss = CN()
    cfg.loss.name = "softmax"
    cfg.loss.softmax = CN()
    cfg.loss.softmax.label_smooth = True
    cfg.loss.triplet = CN()
    cfg.loss.triplet.margin = 0.3
    cfg.loss.triplet.weight_t = 1.0
    cfg.loss.triplet.weight_x = 0.0

    # test
    cfg.test = CN()
    cfg.test.batch_size = 100
    cfg.test.dist_metric = "euclidean"
    cfg.test.normalize_feature = False
    cfg.test.ranks = [1, 5, 10, 20]
    cfg.test.evaluate = False
    cfg.test.eval_freq = -1
    cfg.test.start_eval = 0
    cfg.test.rerank = False
    cfg.test.visrank = False
    cfg.test.visrank_topk = 10
    # Dropped from torchreid's default config in 2020 but still set by every YAML in its configs/
    # folder: accepted so that those files load; nothing reads it.
    cfg.test.visactmap = False

    cfg.attrimeter = _attrimeter_defaults()
    return cfg


def _attrimeter_defaults() -> CN:
    node = CN()
    # The frozen model to explain. Empty = model.name / model.load_weights, so a torchreid YAML
    # that trained the target names it already.
    node.target_name = ""
    node.target_weights = ""
    # Open checkpoints that need full unpickling (can run code): only for files you trust.
    node.trust_checkpoints = False
    # Attribute schema name ('market1501', 'dukemtmc', 'synthetic'); empty = the training dataset's.
    node.schema = ""
    # M, the number of attributes; 0 = as many as the schema has (a different value is an error).
    node.num_attributes = 0
    # Attribute file (market_attribute.mat / duke_attribute.mat layout); empty = the dataset's own
    # file under data.root.
    node.attribute_file = ""
    # 'trunk': a trainable copy of the target's late layers feeds the decomposition head (authors);
    # 'head': the head reads the target's feature map directly (cheaper, any splittable target).
    node.variant = "trunk"
    node.hidden_channels = 256
    node.attribute_branch = False  # attribute-recognition branch trained with weighted BCE
    # Compute the frozen target's stem output and feature map of every training image (and its
    # mirror) once, and train from that store (torchreid_attrimeter/feature_cache.py): each step then
    # costs only the interpreter. Needs data.transforms limited to ['random_flip'] (or none).
    node.cache_target_features = False
    # Loss weights of the authors' code: L = 1 L_dd + 10 L_ap + 100 L_attr.
    node.weight_dd = 1.0
    node.weight_ap = 10.0
    node.weight_attr = 100.0
    # Weak spatial prior (losses.PlacePriorLoss): the maps of attributes with a fixed place in a
    # pedestrian crop (attributes.ATTRIBUTE_PLACES: hat, hair, sleeves, lower-body length, ...) keep their
    # mass in that band of rows. 0 = off.
    node.weight_place = 0.0
    # A named training recipe (PRESETS above: 'paper', 'localised') that fills the keys it names;
    # '' = the keys as set.
    node.preset = ""
    # Linear learning-rate warm-up in front of train.lr_scheduler (authors: 10 epochs from 0.01 lr).
    node.warmup_epochs = 0
    node.warmup_factor = 0.01

    # The distance the interpreter learns to split and is evaluated on ('euclidean' = plain, not
    # squared; 'cosine' = 1 - cos): '' = test.dist_metric, the target's own test metric.
    node.metric = ""

    node.eval = CN()
    # 'all': every query x gallery pair (paper protocol); 'topk': each query's topk gallery items
    # ranked by the target, plus its true matches.
    node.eval.pairs = "all"
    node.eval.topk = 100
    node.eval.memory_budget_mb = 1024
    node.eval.amp = True  # autocast feature extraction on CUDA

    # torchrun runs (torchreid_attrimeter/distributed.py). How long a process waits for the others
    # in a training step before failing (a crashed peer), and for rank 0 to evaluate and save.
    node.distributed = CN()
    node.distributed.timeout_minutes = 30.0
    node.distributed.main_process_timeout_minutes = 240.0
    return node


# --- merging user files and command-line options ----------------------------------------------------


def _all_keys(node: CN, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        full_key = f"{prefix}{key}"
        keys.append(full_key)
        if isinstance(value, CN):
            keys.extend(_all_keys(value, full_key + "."))
    return keys


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    if full_key in REMOVED_KEYS:
        return ConfigError(f"{source}: config key '{full_key}' was removed: {REMOVED_KEYS[full_key]}. "
                           f"Drop the key.")
    known = _all_keys(get_default_config())
    close = difflib.get_close_matches(full_key, known, n=3, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(repr(key) for key in close)}?" if close else ""
    return ConfigError(
        f"{source}: unknown config key '{full_key}'.{suggestion} Accepted keys are those of torchreid's "
        f"scripts/default_config.py plus the 'attrimeter' node (see torchreid_attrimeter/config.py); "
        f"remove the key or fix its spelling."
    )


def _coerce_ints_to_floats(overrides: CN, defaults: CN) -> None:
    """yacs refuses ``10`` where the default is ``10.0``; a YAML author rarely means the difference."""
    for key, value in overrides.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if isinstance(value, CN) and isinstance(default, CN):
            _coerce_ints_to_floats(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            overrides[key] = float(value)


def _check_known_keys(overrides: CN, defaults: CN, source: str, prefix: str = "") -> None:
    for key, value in overrides.items():
        full_key = f"{prefix}{key}"
        if key not in defaults:
            raise _unknown_key_error(full_key, source)
        if isinstance(value, dict) and isinstance(defaults[key], CN):
            _check_known_keys(value, defaults[key], source, full_key + ".")


def merge_from_file(cfg: CN, config_file: str | os.PathLike) -> None:
    """Merge a YAML file into ``cfg``; unknown keys and wrong types raise ConfigError naming the key."""
    path = os.fspath(config_file)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: '{path}'")
    with open(path, encoding="utf-8") as handle:
        try:
            overrides = CN.load_cfg(handle)
        except Exception as error:  # noqa: BLE001 - any YAML parse failure means the same to the user
            raise ConfigError(f"'{path}' is not a readable YAML config: {error}") from None
    _check_known_keys(overrides, cfg, f"config file '{path}'")
    _coerce_ints_to_floats(overrides, cfg)
    try:
        cfg.merge_from_other_cfg(overrides)
    except ValueError as error:
        raise ConfigError(
            f"config file '{path}': {error}. Write the value with the default's type."
        ) from None


def merge_from_list(cfg: CN, opts: Iterable[str]) -> None:
    """Merge ``KEY VALUE`` pairs from the command line into ``cfg``."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(
            f"command-line options must be KEY VALUE pairs, got an odd number of items: {opts}"
        )
    overrides = []
    for key, value in zip(opts[0::2], opts[1::2]):
        node = _parent_node(cfg, key)
        if node is None:
            raise _unknown_key_error(key, "command line")
        decoded = CN._decode_cfg_value(value)
        default = node[key.rsplit(".", 1)[-1]]
        if isinstance(default, float) and isinstance(decoded, int) and not isinstance(decoded, bool):
            decoded = float(decoded)
        overrides.extend([key, decoded])
    try:
        cfg.merge_from_list(overrides)
    except ValueError as error:
        raise ConfigError(f"command line: {error}. Give the value with the default's type.") from None


def _parent_node(cfg: CN, full_key: str) -> Any:
    """The node holding the leaf ``full_key`` (e.g. ``cfg.train`` for 'train.lr'), None if no such leaf."""
    node: Any = cfg
    parts = full_key.split(".")
    for part in parts[:-1]:
        if not isinstance(node, CN) or part not in node:
            return None
        node = node[part]
    if not isinstance(node, CN) or parts[-1] not in node or isinstance(node[parts[-1]], CN):
        return None
    return node


def load_config(config_file: str | os.PathLike | None = None, opts: Iterable[str] = ()) -> CN:
    """Defaults, then the YAML file, then command-line ``KEY VALUE`` pairs, then attrimeter.preset."""
    cfg = get_default_config()
    if config_file:
        merge_from_file(cfg, config_file)
    merge_from_list(cfg, opts)
    apply_preset(cfg)
    return cfg


def apply_preset(cfg: CN) -> None:
    """Give the keys of attrimeter.preset their preset values. A key left at its default takes the
    preset's value; a key set to the preset's value is fine; any other value is a ConfigError."""
    name = cfg.attrimeter.preset
    if not name:
        return
    if name not in PRESETS:
        raise ConfigError(f"attrimeter.preset is '{name}': use one of {sorted(PRESETS)} or '' (the keys as set)")
    defaults = _attrimeter_defaults()
    for key, value in PRESETS[name].items():
        current = cfg.attrimeter[key]
        if current != defaults[key] and current != value:
            raise ConfigError(
                f"attrimeter.preset '{name}' sets attrimeter.{key} to {value}, but the config sets it to {current}: "
                f"drop attrimeter.{key} or the preset"
            )
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.attrimeter[key] = value
        if was_frozen:
            cfg.freeze()


# --- derived values ---------------------------------------------------------------------------------


def target_name(cfg: CN) -> str:
    """The target model's torchreid name: attrimeter.target_name, else model.name."""
    return cfg.attrimeter.target_name or cfg.model.name


def target_weights(cfg: CN) -> str:
    """The target's weights file: attrimeter.target_weights, else model.load_weights."""
    return cfg.attrimeter.target_weights or cfg.model.load_weights


def distance_metric(cfg: CN) -> str:
    """The distance AttriMeter splits: attrimeter.metric, else test.dist_metric."""
    return cfg.attrimeter.metric or cfg.test.dist_metric


def check_attrimeter_config(cfg: CN) -> None:
    """Values AttriMeter training or evaluation cannot use, each reported with the key and the fix.

    Loading a torchreid config never calls this; building the AttriMeter engine does.
    """
    node = cfg.attrimeter
    if node.preset and node.preset not in PRESETS:
        raise ConfigError(f"attrimeter.preset is '{node.preset}': use one of {sorted(PRESETS)} or ''")
    if cfg.data.type != "image":
        raise ConfigError(
            f"data.type is '{cfg.data.type}': AttriMeter works on image datasets; set it to 'image'"
        )
    if not target_weights(cfg):
        raise ConfigError(
            "no target weights: AttriMeter explains a trained model. Set attrimeter.target_weights "
            "(or model.load_weights) to the target's weights file (a torchreid checkpoint or model-zoo file)"
        )
    if node.variant not in VARIANTS:
        raise ConfigError(f"attrimeter.variant is '{node.variant}': use one of {VARIANTS}")
    if node.hidden_channels < 1:
        raise ConfigError(
            f"attrimeter.hidden_channels is {node.hidden_channels}: it must be a positive integer"
        )
    if node.num_attributes < 0:
        raise ConfigError(
            f"attrimeter.num_attributes is {node.num_attributes}: use 0 (= from the schema) or M > 0"
        )
    for key in ("weight_dd", "weight_ap", "weight_attr", "weight_place"):
        if node[key] < 0:
            raise ConfigError(f"attrimeter.{key} is {node[key]}: loss weights must be >= 0")
    if node.weight_dd == 0 and node.weight_ap == 0:
        raise ConfigError(
            "attrimeter.weight_dd and attrimeter.weight_ap are both 0: nothing would be trained"
        )
    if node.warmup_epochs < 0 or not 0 < node.warmup_factor <= 1:
        raise ConfigError(
            f"attrimeter.warmup_epochs={node.warmup_epochs}, attrimeter.warmup_factor={node.warmup_factor}: "
            f"use warmup_epochs >= 0 and 0 < warmup_factor <= 1"
        )
    _check_evaluation_config(cfg)
    if node.cache_target_features:
        try:
            check_cacheable_transforms(cfg.data.transforms, cfg.data.k_tfm)
        except FeatureCacheError as error:  # the cache says what it can serve; here it is a config value
            raise ConfigError(str(error)) from None
    check_numbers(cfg)
    check_sampler_config(cfg)


def _check_evaluation_config(cfg: CN) -> None:
    """The distance metric, torchreid's test options and the attrimeter.eval node."""
    node = cfg.attrimeter
    metric = distance_metric(cfg)
    if metric not in METRICS:
        raise ConfigError(
            f"distance metric '{metric}' (attrimeter.metric / test.dist_metric): "
            f"use one of {METRICS}"
        )
    check_test_options(normalize_feature=cfg.test.normalize_feature, rerank=cfg.test.rerank,
                       visrank=cfg.test.visrank, use_metric_cuhk03=cfg.cuhk03.use_metric_cuhk03)
    if node.eval.pairs not in PAIR_MODES:
        raise ConfigError(f"attrimeter.eval.pairs is '{node.eval.pairs}': use one of {PAIR_MODES}")
    if node.eval.pairs == "topk" and node.eval.topk < 1:
        raise ConfigError(
            f"attrimeter.eval.topk is {node.eval.topk}: it must be >= 1 with eval.pairs 'topk'"
        )
    if node.eval.memory_budget_mb <= 0:
        raise ConfigError(f"attrimeter.eval.memory_budget_mb is {node.eval.memory_budget_mb}: it must be > 0")


def check_test_options(*, normalize_feature: bool, rerank: bool, visrank: bool, use_metric_cuhk03: bool) -> None:
    """Refuse the torchreid test options of ``UNSUPPORTED_TEST_OPTIONS`` that are on, naming each
    with its reason (torchreid's ``Engine.test`` keyword arguments, or the config keys)."""
    given = {"test.normalize_feature": normalize_feature, "test.rerank": rerank, "test.visrank": visrank,
             "cuhk03.use_metric_cuhk03": use_metric_cuhk03}
    refused = [key for key, value in given.items() if value]
    if refused:
        reasons = "; ".join(f"{key} is True: {UNSUPPORTED_TEST_OPTIONS[key]}" for key in refused)
        raise ConfigError(f"{reasons}. Set {' and '.join(refused)} False")


def check_numbers(cfg: CN) -> None:
    """Numeric keys of torchreid's config that have no meaningful value below a bound, where torchreid
    would run on regardless (an untrained model evaluated for max_epoch <= 0) or fail obscurely.

    Evaluation-only runs (test.evaluate / --evaluate) train nothing, so the training-only keys
    (max_epoch, start_epoch, lr, weight_decay, print_freq) are not checked then; the data manager
    still builds the training loader, so batch_size and num_instances always are.
    """
    # (key, value, smallest allowed, whether the bound itself is allowed, what the key means)
    always = [
        ("train.batch_size", cfg.train.batch_size, 1, True, "images per training batch"),
        ("sampler.num_instances", cfg.sampler.num_instances, 1, True, "images per identity in a batch"),
        ("test.batch_size", cfg.test.batch_size, 1, True, "images per evaluation batch"),
        ("data.workers", cfg.data.workers, 0, True, "data-loading processes (0: none)"),
    ]
    training = [
        ("train.max_epoch", cfg.train.max_epoch, 1, True,
         "epochs to train; to evaluate without training use --evaluate (test.evaluate True)"),
        ("train.start_epoch", cfg.train.start_epoch, 0, True, "the epoch training starts from"),
        ("train.lr", cfg.train.lr, 0, False, "the learning rate"),
        ("train.weight_decay", cfg.train.weight_decay, 0, True, "the weight decay"),
        ("train.print_freq", cfg.train.print_freq, 1, True, "batches between two log lines"),
    ]
    for key, value, bound, inclusive, meaning in always + ([] if cfg.test.evaluate else training):
        if value < bound or (value == bound and not inclusive):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"{key} is {value}: it must be {relation} {bound} ({meaning})")
    if not cfg.test.evaluate and not cfg.model.resume and cfg.train.start_epoch >= cfg.train.max_epoch:
        raise ConfigError(
            f"train.start_epoch is {cfg.train.start_epoch} and train.max_epoch {cfg.train.max_epoch}: a new "
            f"run would train nothing. Set train.max_epoch above train.start_epoch, continue a run with "
            f"--resume auto, or evaluate with --evaluate"
        )


def check_sampler_config(cfg: CN) -> None:
    """torchreid's RandomIdentitySampler silently drops the remainder of batch_size / num_instances
    (and fails obscurely when the batch is smaller than num_instances)."""
    batch_size, num_instances = cfg.train.batch_size, cfg.sampler.num_instances
    if cfg.sampler.train_sampler != "RandomIdentitySampler":
        return
    if num_instances < 1 or batch_size < 2 * num_instances or batch_size % num_instances:
        instances = max(num_instances, 1)
        suggestion = max(2, batch_size // instances) * instances
        raise ConfigError(
            f"train.batch_size={batch_size} and sampler.num_instances={num_instances} do not fit "
            f"RandomIdentitySampler: the batch holds P identities x K images, so batch_size must be a "
            f"multiple of num_instances with P >= 2 (e.g. train.batch_size {suggestion})"
        )


# --- keyword arguments for torchreid ------------------------------------------------------------------


def imagedata_kwargs(cfg: CN) -> dict:
    """Keyword arguments for ``ImageDataManager`` (the installed torchreid's spelling of the device)."""
    kwargs = {
        "root": cfg.data.root,
        "sources": cfg.data.sources,
        "targets": cfg.data.targets,
        "height": cfg.data.height,
        "width": cfg.data.width,
        "transforms": cfg.data.transforms,
        "k_tfm": cfg.data.k_tfm,
        "norm_mean": cfg.data.norm_mean,
        "norm_std": cfg.data.norm_std,
        "split_id": cfg.data.split_id,
        "combineall": cfg.data.combineall,
        "load_train_targets": cfg.data.load_train_targets,
        "batch_size_train": cfg.train.batch_size,
        "batch_size_test": cfg.test.batch_size,
        "workers": cfg.data.workers,
        "num_instances": cfg.sampler.num_instances,
        "num_cams": cfg.sampler.num_cams,
        "num_datasets": cfg.sampler.num_datasets,
        "train_sampler": cfg.sampler.train_sampler,
        "train_sampler_t": cfg.sampler.train_sampler_t,
        "cuhk03_labeled": cfg.cuhk03.labeled_images,
        "cuhk03_classic_split": cfg.cuhk03.classic_split,
        "market1501_500k": cfg.market1501.use_500k_distractors,
    }
    # torchreid 1.4.0 (and its PyPI repack) takes use_gpu; the later GitHub code takes device.
    parameters = inspect.signature(compat.ImageDataManager.__init__).parameters
    if "device" in parameters:
        kwargs["device"] = "cuda" if cfg.use_gpu else "cpu"
    else:
        kwargs["use_gpu"] = cfg.use_gpu
    return kwargs


def optimizer_kwargs(cfg: CN) -> dict:
    return {
        "optim": cfg.train.optim,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "momentum": cfg.sgd.momentum,
        "sgd_dampening": cfg.sgd.dampening,
        "sgd_nesterov": cfg.sgd.nesterov,
        "rmsprop_alpha": cfg.rmsprop.alpha,
        "adam_beta1": cfg.adam.beta1,
        "adam_beta2": cfg.adam.beta2,
        "staged_lr": cfg.train.staged_lr,
        "new_layers": cfg.train.new_layers,
        "base_lr_mult": cfg.train.base_lr_mult,
    }


def lr_scheduler_kwargs(cfg: CN) -> dict:
    return {
        "lr_scheduler": cfg.train.lr_scheduler,
        "stepsize": cfg.train.stepsize,
        "gamma": cfg.train.gamma,
        "max_epoch": cfg.train.max_epoch,
    }


def engine_run_kwargs(cfg: CN) -> dict:
    return {
        "save_dir": cfg.data.save_dir,
        "max_epoch": cfg.train.max_epoch,
        "start_epoch": cfg.train.start_epoch,
        "fixbase_epoch": cfg.train.fixbase_epoch,
        "open_layers": cfg.train.open_layers,
        "start_eval": cfg.test.start_eval,
        "eval_freq": cfg.test.eval_freq,
        "test_only": cfg.test.evaluate,
        "print_freq": cfg.train.print_freq,
        "dist_metric": cfg.test.dist_metric,
        "normalize_feature": cfg.test.normalize_feature,
        "visrank": cfg.test.visrank,
        "visrank_topk": cfg.test.visrank_topk,
        "use_metric_cuhk03": cfg.cuhk03.use_metric_cuhk03,
        "ranks": cfg.test.ranks,
        "rerank": cfg.test.rerank,
    }
