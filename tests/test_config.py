"""The yacs config: torchreid's keys and defaults, official torchreid YAML files, the attrimeter node,
errors for unknown keys and unusable values, and the keyword-argument helpers."""

from __future__ import annotations

import glob
import inspect
import os
import re

import pytest

from torchreid_attrimeter import compat
from torchreid_attrimeter.config import (
    ConfigError,
    check_attrimeter_config,
    distance_metric,
    engine_run_kwargs,
    get_default_config,
    imagedata_kwargs,
    load_config,
    lr_scheduler_kwargs,
    optimizer_kwargs,
    target_name,
    target_weights,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torchreid's scripts/default_config.py (KaiyangZhou/deep-person-reid), key -> default, written out
# from that file so a drift in config.py shows up here.
TORCHREID_DEFAULTS = {
    "model.name": "resnet50", "model.pretrained": True, "model.load_weights": "", "model.resume": "",
    "data.type": "image", "data.root": "reid-data", "data.sources": ["market1501"],
    "data.targets": ["market1501"], "data.workers": 4, "data.split_id": 0, "data.height": 256,
    "data.width": 128, "data.combineall": False, "data.transforms": ["random_flip"], "data.k_tfm": 1,
    "data.norm_mean": [0.485, 0.456, 0.406], "data.norm_std": [0.229, 0.224, 0.225],
    "data.save_dir": "log", "data.load_train_targets": False,
    "market1501.use_500k_distractors": False,
    "cuhk03.labeled_images": False, "cuhk03.classic_split": False, "cuhk03.use_metric_cuhk03": False,
    "sampler.train_sampler": "RandomSampler", "sampler.train_sampler_t": "RandomSampler",
    "sampler.num_instances": 4, "sampler.num_cams": 1, "sampler.num_datasets": 1,
    "video.seq_len": 15, "video.sample_method": "evenly", "video.pooling_method": "avg",
    "train.optim": "adam", "train.lr": 0.0003, "train.weight_decay": 5e-4, "train.max_epoch": 60,
    "train.start_epoch": 0, "train.batch_size": 32, "train.fixbase_epoch": 0,
    "train.open_layers": ["classifier"], "train.staged_lr": False, "train.new_layers": ["classifier"],
    "train.base_lr_mult": 0.1, "train.lr_scheduler": "single_step", "train.stepsize": [20],
    "train.gamma": 0.1, "train.print_freq": 20, "train.seed": 1,
    "sgd.momentum": 0.9, "sgd.dampening": 0.0, "sgd.nesterov": False, "rmsprop.alpha": 0.99,
    "adam.beta1": 0.9, "adam.beta2": 0.999,
    "loss.name": "softmax", "loss.softmax.label_smooth": True, "loss.triplet.margin": 0.3,
    "loss.triplet.weight_t": 1.0, "loss.triplet.weight_x": 0.0,
    "test.batch_size": 100, "test.dist_metric": "euclidean", "test.normalize_feature": False,
    "test.ranks": [1, 5, 10, 20], "test.evaluate": False, "test.eval_freq": -1, "test.start_eval": 0,
    "test.rerank": False, "test.visrank": False, "test.visrank_topk": 10,
}

# Four files of torchreid's configs/ folder, verbatim (they set test.visactmap, a key torchreid's
# current default config no longer has, and one misspells 'classsifier').
OFFICIAL_CONFIGS = {
    "im_osnet_x1_0_softmax_256x128_amsgrad.yaml": """model:
  name: 'osnet_x1_0'
  pretrained: True

data:
  type: 'image'
  sources: ['market1501']
  targets: ['market1501']
  height: 256
  width: 128
  combineall: False
  transforms: ['random_flip']
  save_dir: 'log/osnet_x1_0_market1501_softmax'

loss:
  name: 'softmax'
  softmax:
    label_smooth: True

train:
  optim: 'amsgrad'
  lr: 0.0015
  max_epoch: 150
  batch_size: 64
  fixbase_epoch: 10
  open_layers: ['classsifier']
  lr_scheduler: 'single_step'
  stepsize: [60]

test:
  batch_size: 300
  dist_metric: 'euclidean'
  normalize_feature: False
  evaluate: False
  eval_freq: 10
  rerank: False
  visactmap: False""",
    "im_r50_softmax_256x128_amsgrad.yaml": """model:
  name: 'resnet50_fc512'
  pretrained: True

data:
  type: 'image'
  sources: ['market1501']
  targets: ['market1501']
  height: 256
  width: 128
  combineall: False
  transforms: ['random_flip']
  save_dir: 'log/resnet50_market1501_softmax'

loss:
  name: 'softmax'
  softmax:
    label_smooth: True

train:
  optim: 'amsgrad'
  lr: 0.0003
  max_epoch: 60
  batch_size: 32
  fixbase_epoch: 5
  open_layers: ['classsifier']
  lr_scheduler: 'single_step'
  stepsize: [20]

test:
  batch_size: 100
  dist_metric: 'euclidean'
  normalize_feature: False
  evaluate: False
  eval_freq: 10
  rerank: False
  visactmap: False""",
    "im_osnet_ain_x1_0_softmax_256x128_amsgrad_cosine.yaml": """model:
  name: 'osnet_ain_x1_0'
  pretrained: True

data:
  type: 'image'
  sources: ['market1501']
  targets: ['market1501', 'dukemtmcreid']
  height: 256
  width: 128
  combineall: False
  transforms: ['random_flip', 'color_jitter']
  save_dir: 'log/osnet_ain_x1_0_market1501_softmax_cosinelr'

loss:
  name: 'softmax'
  softmax:
    label_smooth: True

train:
  optim: 'amsgrad'
  lr: 0.0015
  max_epoch: 100
  batch_size: 64
  fixbase_epoch: 10
  open_layers: ['classifier']
  lr_scheduler: 'cosine'

test:
  batch_size: 300
  dist_metric: 'cosine'
  normalize_feature: False
  evaluate: False
  eval_freq: -1
  rerank: False
  visactmap: False""",
    "im_pcbrpp6p_softmax_256x128_amsgrad_trainall.yaml": """model:
  name: 'pcb_rpp_p6'
  pretrained: True
  load_weights: 'log/pcb_rpp_p6_market1501_trainall/model.pth.tar-20'

data:
  type: 'image'
  sources: ['market1501']
  targets: ['market1501']
  height: 256
  width: 128
  combineall: False
  transforms: ['random_flip','random_crop','random_erase']
  norm_mean: [0.485, 0.456, 0.406]
  norm_std: [0.229, 0.224, 0.225]
  save_dir: 'log/pcb_rpp_p6_market1501_trainall'

sampler:
  train_sampler: 'RandomSampler'

loss:
  name: 'softmax'
  softmax:
    label_smooth: True

train:
  optim: 'amsgrad'
  lr: 0.0003
  max_epoch: 20
  batch_size: 32
  staged_lr: True
  new_layers: ['parts_avgpool', 'classifier']
  base_lr_mult: 0.1
  lr_scheduler: 'multi_step'
  stepsize: [5,10]
  gamma: 0.1
  print_freq: 20

test:
  batch_size: 100
  dist_metric: 'euclidean'
  normalize_feature: True
  evaluate: True
  eval_freq: 10
  rerank: True
  visactmap: False
""",
}

# The README's swap from torchreid's osnet_x1_0 file to AttriMeter, as the lines that change.
ATTRIMETER_SWAP = """model:
  name: 'osnet_x1_0'
  pretrained: True
  load_weights: 'log/osnet_x1_0_market1501_softmax/model/model.pth.tar-150'

data:
  type: 'image'
  sources: ['market1501_attr']
  targets: ['market1501_attr']
  height: 256
  width: 128
  combineall: False
  transforms: ['random_flip']
  save_dir: 'log/osnet_x1_0_market1501_attrimeter'

sampler:
  train_sampler: 'RandomIdentitySampler'
  num_instances: 4

loss:
  name: 'softmax'
  softmax:
    label_smooth: True

train:
  optim: 'adam'
  lr: 0.0001
  max_epoch: 60
  batch_size: 64
  fixbase_epoch: 10
  open_layers: ['classsifier']
  lr_scheduler: 'single_step'
  stepsize: [60]

test:
  batch_size: 300
  dist_metric: 'euclidean'
  normalize_feature: False
  evaluate: False
  eval_freq: 10
  rerank: False
  visactmap: False"""


def _value(cfg, full_key):
    node = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_config_has_every_torchreid_key_with_its_default():
    cfg = get_default_config()
    for key, default in TORCHREID_DEFAULTS.items():
        assert _value(cfg, key) == default, key


def test_default_config_adds_the_attrimeter_node_with_the_authors_loss_weights():
    node = get_default_config().attrimeter
    assert (node.weight_dd, node.weight_ap, node.weight_attr) == (1.0, 10.0, 100.0)
    assert node.variant == "trunk" and node.hidden_channels == 256 and node.attribute_branch is False
    assert node.eval.pairs == "all" and node.eval.memory_budget_mb > 0


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_official_torchreid_config_files_load_unchanged(tmp_path, name):
    cfg = load_config(_write(tmp_path, name, OFFICIAL_CONFIGS[name]))
    assert f"name: '{cfg.model.name}'" in OFFICIAL_CONFIGS[name]
    assert f"save_dir: '{cfg.data.save_dir}'" in OFFICIAL_CONFIGS[name]
    assert cfg.train.optim == "amsgrad" and cfg.test.visactmap is False


def test_values_from_the_file_and_then_the_command_line_are_applied(tmp_path):
    path = _write(tmp_path, "osnet.yaml", OFFICIAL_CONFIGS["im_osnet_x1_0_softmax_256x128_amsgrad.yaml"])
    cfg = load_config(path, ["train.max_epoch", "3", "attrimeter.weight_ap", "5"])
    assert cfg.train.lr == 0.0015 and cfg.train.stepsize == [60]
    assert cfg.train.max_epoch == 3
    assert cfg.attrimeter.weight_ap == 5.0 and isinstance(cfg.attrimeter.weight_ap, float)


def test_the_documented_swap_to_attrimeter_passes_the_attrimeter_checks(tmp_path):
    cfg = load_config(_write(tmp_path, "swap.yaml", ATTRIMETER_SWAP))
    check_attrimeter_config(cfg)
    assert target_name(cfg) == "osnet_x1_0"
    assert target_weights(cfg).endswith("model.pth.tar-150")
    assert distance_metric(cfg) == "euclidean"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "attrimeter_*.yaml"))),
                         ids=os.path.basename)
def test_shipped_attrimeter_configs_load_and_pass_the_attrimeter_checks(path):
    cfg = load_config(path)
    check_attrimeter_config(cfg)
    assert cfg.data.sources and all(name.endswith("_attr") for name in cfg.data.sources)


def test_the_demo_target_config_is_a_plain_torchreid_config():
    cfg = load_config(os.path.join(REPO, "configs", "synthetic_demo_target.yaml"))
    assert cfg.attrimeter == get_default_config().attrimeter
    assert cfg.model.pretrained is False and cfg.model.name in compat.available_model_names()


def test_unknown_key_in_a_file_names_the_key_the_file_and_a_close_match(tmp_path):
    path = _write(tmp_path, "typo.yaml", "train:\n  max_epochs: 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.max_epochs" in message and "typo.yaml" in message and "train.max_epoch" in message


def test_unknown_key_on_the_command_line_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="attrimeter.weigth_ap"):
        load_config(None, ["attrimeter.weigth_ap", "1.0"])


def test_wrong_value_type_names_the_key(tmp_path):
    path = _write(tmp_path, "types.yaml", "train:\n  lr: 'fast'\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(path)


def test_odd_number_of_command_line_items_is_an_error():
    with pytest.raises(ConfigError, match="KEY VALUE"):
        load_config(None, ["train.lr"])


def test_missing_config_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(str(tmp_path / "nowhere.yaml"))


def _attrimeter_cfg(**overrides):
    cfg = get_default_config()
    cfg.model.load_weights = "target.pth"
    cfg.merge_from_list([item for pair in overrides.items() for item in pair])
    return cfg


def test_batch_size_not_a_multiple_of_num_instances_names_both_keys():
    cfg = _attrimeter_cfg(**{"sampler.train_sampler": "RandomIdentitySampler", "train.batch_size": 10,
                             "sampler.num_instances": 4})
    with pytest.raises(ConfigError) as error:
        check_attrimeter_config(cfg)
    assert "train.batch_size" in str(error.value) and "sampler.num_instances" in str(error.value)


def test_batch_of_a_single_identity_is_refused():
    cfg = _attrimeter_cfg(**{"sampler.train_sampler": "RandomIdentitySampler", "train.batch_size": 4,
                             "sampler.num_instances": 4})
    with pytest.raises(ConfigError, match="P >= 2"):
        check_attrimeter_config(cfg)


def test_attrimeter_needs_target_weights():
    cfg = get_default_config()
    with pytest.raises(ConfigError, match="attrimeter.target_weights"):
        check_attrimeter_config(cfg)


def test_attrimeter_target_keys_override_the_model_keys():
    cfg = _attrimeter_cfg(**{"attrimeter.target_name": "osnet_x0_25", "attrimeter.target_weights": "b.pth"})
    assert target_name(cfg) == "osnet_x0_25" and target_weights(cfg) == "b.pth"


@pytest.mark.parametrize("key, value, named", [
    ("test.normalize_feature", True, "test.normalize_feature"),
    ("test.rerank", True, "test.rerank"),
    ("attrimeter.variant", "tail", "attrimeter.variant"),
    ("attrimeter.eval.pairs", "some", "attrimeter.eval.pairs"),
    ("test.dist_metric", "manhattan", "test.dist_metric"),
    ("attrimeter.weight_ap", -1.0, "attrimeter.weight_ap"),
    ("data.type", "video", "data.type"),
])
def test_values_attrimeter_cannot_use_are_errors_naming_the_key(key, value, named):
    cfg = _attrimeter_cfg(**{key: value})
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        check_attrimeter_config(cfg)


def test_imagedata_kwargs_are_parameters_of_the_installed_image_datamanager():
    parameters = inspect.signature(compat.ImageDataManager.__init__).parameters
    assert set(imagedata_kwargs(get_default_config())) <= set(parameters)


def test_optimizer_and_scheduler_kwargs_are_parameters_of_torchreids_builders():
    cfg = get_default_config()
    assert set(optimizer_kwargs(cfg)) <= set(inspect.signature(compat.build_optimizer).parameters)
    assert set(lr_scheduler_kwargs(cfg)) <= set(inspect.signature(compat.build_lr_scheduler).parameters)


def test_engine_run_kwargs_are_parameters_of_torchreids_engine_run():
    run_parameters = inspect.signature(compat.Engine.run).parameters
    assert set(engine_run_kwargs(get_default_config())) <= set(run_parameters)


@pytest.mark.parametrize("key, value", [
    ("train.max_epoch", 0), ("train.max_epoch", -1), ("train.batch_size", 0), ("train.batch_size", -8),
    ("train.lr", 0.0), ("train.lr", -0.1), ("sampler.num_instances", 0), ("test.batch_size", 0),
    ("data.workers", -1), ("train.start_epoch", -1), ("train.weight_decay", -1.0), ("train.print_freq", 0),
])
def test_numbers_without_meaning_are_errors_naming_the_key_and_the_bound(key, value):
    cfg = _attrimeter_cfg(**{key: value})
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} is {re.escape(str(value))}: it must be"):
        check_attrimeter_config(cfg)


def test_a_non_positive_max_epoch_points_to_evaluate_only_mode():
    with pytest.raises(ConfigError, match="--evaluate"):
        check_attrimeter_config(_attrimeter_cfg(**{"train.max_epoch": -1}))


def test_evaluation_only_ignores_the_training_only_numbers_but_not_the_batch_sizes():
    cfg = _attrimeter_cfg(**{"test.evaluate": True, "train.max_epoch": 0, "train.lr": 0.0})
    check_attrimeter_config(cfg)  # max_epoch and lr do not matter when nothing is trained
    cfg.train.batch_size = 0  # the data manager still builds the training loader
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_attrimeter_config(cfg)


def test_a_new_run_starting_at_or_after_max_epoch_is_an_error():
    cfg = _attrimeter_cfg(**{"train.start_epoch": 5, "train.max_epoch": 5})
    with pytest.raises(ConfigError, match="train.start_epoch"):
        check_attrimeter_config(cfg)
    cfg.model.resume = "auto"  # a resumed run takes its start epoch from the checkpoint
    check_attrimeter_config(cfg)
