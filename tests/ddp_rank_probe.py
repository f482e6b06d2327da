"""`python tests/ddp_rank_probe.py train ...` is `segforge train ...` with a probe in every DDP rank: rank 1 sleeps
``$PROBE_SLEEP_S`` in every training step (a slow rank: its clock runs differently from rank 0's), and each rank
writes what it trained to ``$PROBE_DIR/rank_<global rank>.pt`` when training ends: the learning rate and epoch of
every step, the validation batches it ran, its last step and its final weights.

Lightning starts the second rank by running this script again with the same arguments, so both ranks carry it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from segforge.cli.main import main
from segforge.training.module import SegmentationModule

PROBE_DIR = Path(os.environ["PROBE_DIR"])
SLEEP_S = float(os.environ["PROBE_SLEEP_S"])
record: dict[str, list] = {"lr": [], "epoch_of_step": [], "val_batches": []}
training_step, validation_step = SegmentationModule.training_step, SegmentationModule.validation_step


def slowed_training_step(self, batch, batch_idx):
    if self.global_rank == 1:
        time.sleep(SLEEP_S)
    record["lr"].append(self.trainer.optimizers[0].param_groups[0]["lr"])
    record["epoch_of_step"].append(self.current_epoch)
    return training_step(self, batch, batch_idx)


def counted_validation_step(self, batch, batch_idx):
    if not self.trainer.sanity_checking:
        record["val_batches"].append(self.current_epoch)
    return validation_step(self, batch, batch_idx)


def write_record(self) -> None:
    weights = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
    torch.save({**record, "global_step": self.trainer.global_step, "weights": weights},
               PROBE_DIR / f"rank_{self.global_rank}.pt")


SegmentationModule.training_step = slowed_training_step
SegmentationModule.validation_step = counted_validation_step
SegmentationModule.on_train_end = write_record

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
