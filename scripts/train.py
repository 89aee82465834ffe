#!/usr/bin/env python
"""Train a Korean→English Transformer.

    python scripts/train.py                                   # small model, embedded bible corpus
    python scripts/train.py model=tiny data=tatoeba_ko_en train.max_steps=200
    python scripts/train.py train.max_minutes=40              # the default recipe, decaying to 0 at 40 minutes
    python scripts/train.py -m optim.lr=1e-3,2e-3,4e-3         # a sweep, one run directory each

Every key of conf/ can be overridden; see the README.
"""
import hydra
from omegaconf import DictConfig

from nmt.cli import run_training
from nmt.config import register_configs

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
