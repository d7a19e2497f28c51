"""What a run's checkpoints record besides the weights, and writing them from the main
process every epoch (and at step checkpoints and stop signals)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf

from vit_cli.checkpoint import FORMAT_VERSION, rng_state, save_checkpoint
from vit_cli.components import Components
from vit_cli.config import TrainConfig
from vit_cli.train_state import TrainState


def recorded_config(cfg: TrainConfig, num_classes: int, precision_chosen: str) -> dict:
    """The config as checkpoints and TensorBoard record it: `cfg`, with what the run decided
    from its data (the class count, which data=imagefolder may leave out) and from its
    device (what precision=amp came to: `precision.chosen`)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=num_classes))
    recorded = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return {**recorded, "precision": {**recorded["precision"], "chosen": precision_chosen}}


def run_record(cfg: TrainConfig, c: Components, world_size: int) -> dict:
    """What every checkpoint records besides the state: what inference needs to read images
    as the model saw them, and the batch sizes of the job."""
    return {
        "data": {
            "class_names": c.data.class_names,
            "num_classes": c.data.num_classes,
            "in_chans": c.data.in_chans,
            "img_size": c.img_size,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "distributed": {
            "world_size": world_size,
            "batch_size": cfg.data.batch_size,
            "accumulate": cfg.trainer.accumulate,
            "global_batch": cfg.data.batch_size * world_size * cfg.trainer.accumulate,
        },
    }


class CheckpointWriter:
    """Writes a run's `last.pt` (and `best.pt`) from the main process, with every process's
    random state and the epoch's sums of all processes."""

    def __init__(self, c: Components, cfg_dict: dict, record: dict, run_dir: Path) -> None:
        self.c, self.cfg_dict, self.record = c, cfg_dict, record
        self.last, self.best = run_dir / "last.pt", run_dir / "best.pt"

    def save(self, state: TrainState, metrics: dict[str, float], best: bool = False) -> None:
        runtime = self.c.training.runtime
        rng_states = runtime.gather(rng_state())
        saved_state = state.summed(runtime)
        if not runtime.is_main:
            return
        c, updater = self.c, self.c.training.updater
        ckpt = {
            "format_version": FORMAT_VERSION,
            "model": c.model.state_dict(),
            "optimizer": updater.optimizer.state_dict(),
            "scheduler": updater.scheduler.state_dict(),
            "scaler": updater.scaler.state_dict(),
            "state": dataclasses.asdict(saved_state),
            "metrics": metrics,
            "rng": rng_states[0],
            "config": self.cfg_dict,
            **self.record,
        }
        if len(rng_states) > 1:
            ckpt["rng_ranks"] = rng_states
        if c.ema is not None:
            ckpt["ema"] = c.ema.state_dict()
        save_checkpoint(ckpt, self.last, *([self.best] if best else []))
