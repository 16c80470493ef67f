"""python -m ldm_train stage=clip|vae|unet|all [key=value ...]: compose the config and train one
stage (train), or the chain clip -> vae -> unet (stage=all: chain.train_chain)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ldm_train.chain import train_chain
from ldm_train.config import check_overrides, config_dir
from ldm_train.errors import UserError
from ldm_train.train import train


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):  # in a multirun each job writes to its own folder
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    try:
        run = train_chain if cfg.stage.name == "all" else train
        metrics, _ = run(cfg)
    except UserError as error:  # the user's mistake: one line, no traceback
        print(f"ldm_train: error: {error}", file=sys.stderr)
        sys.exit(2)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


def cli() -> None:
    try:
        check_overrides(sys.argv[1:])
    except UserError as error:
        print(f"ldm_train: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
