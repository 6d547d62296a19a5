"""tools/train.py under torchrun: two CPU processes (gloo) train an interpreter with
DistributedDataParallel on a tiny synthetic dataset; both end with the same weights, saw different
identities at every step and no image twice, rank 0 alone writes the log, checkpoint and results, and
its checkpoint resumes in a one-process run. Plus the sampler's plan and the configuration errors,
without processes.

This file is also the worker torchrun starts (``python tests/test_distributed.py --worker OUT -- ARGS``):
it runs tools/train.py's main and records what its rank trained on.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import list_checkpoints
from torchreid_attrimeter.config import ConfigError, get_default_config
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset
from torchreid_attrimeter.distributed import (
    DistributedContext,
    DistributedIdentitySampler,
    check_distributed_config,
    distributed_train_loader,
    launched_by_torchrun,
)
from torchreid_attrimeter.engine import AttriMeterEngine

TINY_DATASET = {
    "num_train_identities": 8, "num_test_identities": 4, "num_cameras": 2, "min_images_per_identity": 4,
    "max_images_per_identity": 4, "num_distractor_images": 0, "num_junk_images": 0, "image_height": 64,
    "image_width": 32,
}

# train.batch_size 8 is the global batch: P=4 identities x K=2, i.e. 2 identities x 2 per process.
CONFIG = """model:
  name: 'osnet_x0_25'
  pretrained: False
  load_weights: '{weights}'
data:
  root: '{root}'
  sources: ['synthetic_attr']
  targets: ['synthetic_attr']
  height: 64
  width: 32
  workers: 0
  save_dir: '{save_dir}'
sampler:
  train_sampler: 'RandomIdentitySampler'
  num_instances: 2
train:
  optim: 'adam'
  lr: 0.001
  max_epoch: 1
  batch_size: 8
  print_freq: 1
test:
  batch_size: 16
  ranks: [1]
attrimeter:
  variant: 'head'
  hidden_channels: 8
  eval:
    amp: False
  distributed:
    timeout_minutes: 2.0
    main_process_timeout_minutes: 2.0
"""


def run_worker(out_dir: str, argv: list[str]) -> None:
    """One torchrun process: tools/train.py's main, recording the batches and final weights."""
    from torchreid_attrimeter.cli import train as train_tool

    seen = []
    original_step = AttriMeterEngine.forward_backward

    crash_rank = os.environ.get("CRASH_RANK")

    def recording_step(self, data):
        if os.environ["RANK"] == crash_rank and len(seen) == 1:
            raise RuntimeError("simulated crash of one process")
        seen.append({"epoch": self.epoch, "impaths": list(data["impath"]), "pids": data["pid"].tolist()})
        return original_step(self, data)

    AttriMeterEngine.forward_backward = recording_step
    engines = []
    original_make = train_tool.make_engine_distributed

    def capturing_make(engine, cfg, context):
        engines.append(engine)
        original_make(engine, cfg, context)

    train_tool.make_engine_distributed = capturing_make
    train_tool.main(argv)
    torch.save({"weights": engines[0].model.interpreter_state_dict(), "seen": seen},
               os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_dataset(str(root), seed=11, **TINY_DATASET)
    return str(root)


def write_config(folder: str, data_root: str) -> tuple[str, str]:
    torch.manual_seed(0)
    model = compat.build_model("osnet_x0_25", num_classes=8, loss="softmax", pretrained=False, use_gpu=False)
    weights = os.path.join(folder, "osnet_x0_25.pth")
    torch.save(model.state_dict(), weights)
    save_dir = os.path.join(folder, "log")
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as handle:
        handle.write(CONFIG.format(weights=weights, root=data_root, save_dir=save_dir))
    return path, save_dir


def torchrun(out_dir: str, argv: list[str], nproc: int = 2, **variables: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **variables)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.abspath(__file__), "--worker", out_dir, "--", *argv]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240, cwd=REPO,
                          check=False)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_in_one(data_root, tmp_path):
    config, save_dir = write_config(str(tmp_path), data_root)
    result = torchrun(str(tmp_path), ["--config-file", config])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    # Gradients are averaged and BN statistics averaged after each epoch: the same interpreter.
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
    # Each rank: 2 identities x 2 images per step, as many steps as the other (at most 16 groups of 2
    # images / 4 identities per global step; fewer when the draw leaves < 4 identities with groups).
    steps = [rank["seen"] for rank in ranks]
    assert len(steps[0]) == len(steps[1]) and 2 <= len(steps[0]) <= 4
    for step0, step1 in zip(*steps):
        assert len(step0["impaths"]) == len(step1["impaths"]) == 4
        assert len(set(step0["pids"])) == len(set(step1["pids"])) == 2
        assert not set(step0["pids"]) & set(step1["pids"])  # different identities at every step
    images = [[path for step in rank for path in step["impaths"]] for rank in steps]
    assert len(set(images[0])) == len(images[0]) and len(set(images[1])) == len(images[1])
    assert not set(images[0]) & set(images[1])  # no image seen twice in the epoch, on either rank

    # Rank 0 alone wrote the log, the checkpoint (holding the shared weights) and the results.
    assert len(glob.glob(os.path.join(save_dir, "train.log-*"))) == 1
    assert len(glob.glob(os.path.join(save_dir, "results-*.json"))) == 1
    assert not glob.glob(os.path.join(save_dir, "model", "*.tmp"))
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == [1]
    checkpoint = compat.load_checkpoint(list_checkpoints(save_dir)[0][1])
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key

    # The same checkpoint resumes in a plain one-process run.
    from torchreid_attrimeter.cli import train as train_tool

    assert not launched_by_torchrun()
    record = train_tool.main(["--config-file", config, "--resume", "auto", "train.max_epoch", "2"])
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == [1, 2]
    assert record["epoch"] == 2 and record["datasets"]["synthetic_attr"]["interpreter_rank1"] >= 0


@pytest.mark.slow
def test_a_world_size_that_does_not_split_the_batch_stops_every_rank(data_root, tmp_path):
    config, save_dir = write_config(str(tmp_path), data_root)
    # P=3 identities per batch cannot be split over 2 processes: each rank checks it before training
    # and exits. torchrun stops the other rank as soon as one fails, so the message may come once.
    result = torchrun(str(tmp_path), ["--config-file", config, "train.batch_size", "6"])
    assert result.returncode != 0
    assert result.stderr.count("cannot be split over 2 processes") >= 1, result.stderr[-3000:]
    assert not os.path.isdir(os.path.join(save_dir, "model"))


@pytest.mark.slow
def test_a_crashed_process_stops_the_run_without_a_checkpoint(data_root, tmp_path):
    config, save_dir = write_config(str(tmp_path), data_root)
    result = torchrun(str(tmp_path), ["--config-file", config], CRASH_RANK="1")
    assert result.returncode != 0
    assert "simulated crash of one process" in result.stderr
    assert not glob.glob(os.path.join(save_dir, "model", "*"))  # neither a checkpoint nor a .tmp


def train_list(identities: int, images: int) -> list[tuple]:
    return [(f"{pid}_{index}.jpg", pid, index % 2, 0) for pid in range(identities) for index in range(images)]


def test_identity_sampler_splits_each_global_batch_by_identity():
    data = train_list(identities=10, images=5)  # 5 images, K=2: 2 groups per identity, one image left
    samplers = [DistributedIdentitySampler(data, batch_size=8, num_instances=2, rank=rank, world_size=2,
                                           seed=3) for rank in (0, 1)]
    plans = []
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        indices = [list(sampler) for sampler in samplers]
        assert len(indices[0]) == len(indices[1]) == len(samplers[0]) > 0
        assert len(indices[0]) % 4 == 0
        for start in range(0, len(indices[0]), 4):  # one per-process batch: 2 identities x 2 images
            pids = [{data[index][1] for index in rank[start:start + 4]} for rank in indices]
            assert len(pids[0]) == len(pids[1]) == 2 and not pids[0] & pids[1]
        everything = indices[0] + indices[1]
        assert len(set(everything)) == len(everything)
        plans.append(indices[0])
    assert plans[0] != plans[1]  # a new plan every epoch, the same on every rank (checked above)


def test_identity_sampler_errors():
    data = train_list(identities=3, images=4)
    with pytest.raises(ConfigError, match="fewer than the P=4"):
        DistributedIdentitySampler(data, batch_size=8, num_instances=2, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="multiple of the world size"):
        DistributedIdentitySampler(train_list(8, 4), batch_size=8, num_instances=2, rank=0, world_size=3)


def test_random_sampler_loader_gives_each_rank_half_of_the_global_batch():
    cfg = get_default_config()
    cfg.sampler.train_sampler = "RandomSampler"
    cfg.train.batch_size = 8
    dataset = torch.utils.data.TensorDataset(torch.arange(21))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    seen = []
    for rank in (0, 1):
        context = DistributedContext(rank, 2, rank, "gloo", torch.device("cpu"), control_group=None)
        rank_loader = distributed_train_loader(loader, cfg, context)
        context.start_epoch(1)
        batches = [batch[0].tolist() for batch in rank_loader]
        assert [len(batch) for batch in batches] == [4, 4]  # 10 of the 21 items each, whole batches
        seen.append({item for batch in batches for item in batch})
    assert not seen[0] & seen[1]


def test_distributed_config_errors():
    cfg = get_default_config()
    cfg.sampler.train_sampler = "RandomIdentitySampler"
    cfg.sampler.num_instances = 4
    cfg.train.batch_size = 32  # P = 8
    check_distributed_config(cfg, 4)
    with pytest.raises(ConfigError, match=r"P=8 identities .* cannot be split over 3 processes.*batch_size 24"):
        check_distributed_config(cfg, 3)
    with pytest.raises(ConfigError, match="at least 2 identities per process"):
        check_distributed_config(cfg, 8)
    cfg.sampler.train_sampler = "RandomDomainSampler"
    with pytest.raises(ConfigError, match="sampler.train_sampler 'RandomDomainSampler'"):
        check_distributed_config(cfg, 2)
    cfg.sampler.train_sampler = "RandomSampler"
    cfg.train.batch_size = 30
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_distributed_config(cfg, 4)
    cfg.train.batch_size = 32
    cfg.attrimeter.distributed.timeout_minutes = 0.0
    with pytest.raises(ConfigError, match="attrimeter.distributed.timeout_minutes"):
        check_distributed_config(cfg, 4)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_out = sys.argv[sys.argv.index("--worker") + 1]
    run_worker(worker_out, sys.argv[sys.argv.index("--") + 1:])
