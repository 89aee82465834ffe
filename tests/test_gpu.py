"""The CUDA path (skipped without a GPU): bf16 autocast training, the unsynchronised update with
fused Adam, pinned and padded batches, and checkpoints that load on the CPU."""
from __future__ import annotations

import pytest
import torch

from nmt.checkpoint import load_for_inference
from nmt.train import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_a_short_cuda_run_trains_in_bf16_and_its_checkpoint_loads_on_the_cpu(make_cfg, tmp_path):
    trainer = Trainer(make_cfg("device=cuda", "train.max_steps=6", "train.valid_every=3", "train.log_every=2"),
                      tmp_path)
    assert trainer.device.type == "cuda" and trainer.pad_multiple == 8
    assert trainer.amp == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    assert trainer.opt.fused
    summary = trainer.run()
    assert summary["step"] == 6 and summary["last_valid"]["step"] == 6
    model, _, _, _ = load_for_inference(tmp_path, device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_the_device_skips_a_non_finite_update_without_reading_back(make_cfg, tmp_path):
    from nmt.step import train_step

    trainer = Trainer(make_cfg("device=cuda", "train.max_steps=1"), tmp_path)
    idx = next(iter(trainer.sampler))
    batch = trainer._collate(idx)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = trainer.model.output_proj.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    u = train_step(trainer.model, trainer.forward, trainer.opt, [batch], trainer.device, trainer.amp, 0.1, 1.0,
                   sync=False)
    hook.remove()
    assert u.ok.device.type == "cuda" and not bool(u.ok)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
