"""ParallelDims: a TP x PP layout checked against the world size, the model and the devices, with one clear error
before any process starts; and how it splits a model's layers into stages."""

import pytest

from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.errors import ConfigError
from torchchat.model import KNOWN_MODELS, ModelArgs


def test_world_size_must_match():
    with pytest.raises(ConfigError, match=r"--tp 2 x --pp 2 = 4 processes, but the world size is 3: run torchrun "
                                          r"--nproc-per-node 4 \(or change --tp/--pp\)"):
        ParallelDims(tp=2, pp=2, world_size=3)
    with pytest.raises(ConfigError, match=r"--pp \(0\) must be at least 1"):
        ParallelDims(tp=1, pp=0, world_size=0)


def test_tp_must_divide_the_heads():
    with pytest.raises(ConfigError, match=r"--tp 2 must divide the query heads \(9\) and the key/value heads \(3\) "
                                          r"of smollm2-135m; try --tp 3"):
        ParallelDims(tp=2, pp=1, world_size=2).check_model(KNOWN_MODELS["smollm2-135m"])
    odd = ModelArgs(dim=35, n_layers=2, n_heads=7, vocab_size=101, hidden_dim=64)
    with pytest.raises(ConfigError, match="cannot be split by tensor parallelism: use --pp"):
        ParallelDims(tp=7, pp=1, world_size=7).check_model(odd, "odd")


def test_pp_must_not_exceed_the_layers():
    with pytest.raises(ConfigError, match=r"--pp 31 stages but smollm2-135m has 30 layers; use at most --pp 30"):
        ParallelDims(tp=1, pp=31, world_size=31).check_model(KNOWN_MODELS["smollm2-135m"])


def test_uneven_stages():
    assert [len(r) for r in ParallelDims(1, 4, 4).stage_layers(30)] == [8, 8, 7, 7]
    assert ParallelDims(1, 3, 3).stage_layers(30)[2] == range(20, 30)


def test_more_gpus_than_visible(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"needs 4 GPUs on this node but 2 are visible"):
        ParallelDims(tp=2, pp=2, world_size=4).check_devices("cuda")
    ParallelDims(tp=2, pp=2, world_size=4).check_devices("cpu")
