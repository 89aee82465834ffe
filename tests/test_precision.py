"""precision=auto on the CPU: bf16 autocast for training only where bf16 matmuls measure faster,
rank 0's choice for every rank, and a resumed run keeps the precision its checkpoint records."""
import pytest
import torch

from nmt import runtime
from nmt.checkpoint import load_checkpoint
from nmt.train import Trainer, train

CPU = torch.device("cpu")


@pytest.fixture
def speedup(monkeypatch):
    """Set the measured bf16/fp32 matmul speed ratio that precision=auto sees."""
    def set_to(value):
        monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: value)
    return set_to


def test_auto_trains_in_bf16_only_where_it_measures_faster(speedup):
    speedup(3.0)
    assert runtime.autocast_dtype("auto", CPU, training=True) == torch.bfloat16
    assert runtime.autocast_dtype("auto", CPU) is None                   # inference stays fp32
    speedup(0.55)                                                         # AVX512-BF16 without AMX, measured
    assert runtime.autocast_dtype("auto", CPU, training=True) is None
    speedup(0.0)                                                          # no bf16 instructions
    assert runtime.autocast_dtype("auto", CPU, training=True) is None
    assert runtime.autocast_dtype("bf16", CPU, training=True) == torch.bfloat16   # asked for: obeyed
    assert runtime.autocast_dtype("fp32", CPU, training=True) is None


def test_the_measurement_is_a_positive_ratio_or_zero_without_bf16_instructions(monkeypatch):
    runtime.cpu_bf16_speedup.cache_clear()
    try:
        ratio = runtime.cpu_bf16_speedup()
        assert (ratio > 0) == runtime.cpu_has_native_bf16()
        assert runtime.cpu_bf16_speedup() == ratio                       # measured once per process
        runtime.cpu_bf16_speedup.cache_clear()
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
        assert runtime.cpu_bf16_speedup() == 0.0
    finally:
        runtime.cpu_bf16_speedup.cache_clear()


@pytest.mark.slow
def test_a_resumed_run_keeps_the_precision_its_checkpoint_records(make_cfg, tmp_path, speedup):
    common = ("train.valid_every=3", "train.save_every=0")
    speedup(3.0)
    train(make_cfg("train.max_steps=3", *common), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["precision"] == "bf16"
    speedup(0.5)                                   # the same run resumed where bf16 measures slow
    trainer = Trainer(make_cfg("train.max_steps=6", "train.resume=true", *common), tmp_path)
    assert trainer.amp == torch.bfloat16
    assert Trainer(make_cfg("train.max_steps=6", *common), tmp_path / "fresh").amp is None
    summary = train(make_cfg("train.max_steps=6", "train.resume=true", *common), tmp_path)
    assert summary["step"] == 6 and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["precision"] == "bf16"
