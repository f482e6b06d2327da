"""nnU-Net v2's trainer with its epoch count fitted to a wall-clock budget (the ``nnunet`` arm of
``scripts/bench_budget.py``).

Imported as ``bench.budget_nnunet_trainer`` in the child process of ``bench.budget_nnunet.stage_train`` (it
imports nnunetv2 and torch at module level: never import it in the parent). The object is built and run
directly from Python, so nnU-Net's trainer lookup by class name (``nnUNetv2_train -tr``) is not needed; for
prediction, ``bench.budget_nnunet.stage_predict`` builds the network itself (this class does not change it).

``nnUNetTrainerBudget`` is ``nnUNetTrainer`` (its network, loss, augmentation, loaders, SGD with Nesterov
momentum 0.99, poly learning rate over epochs, checkpoints) except for how long it trains:

1. the budget clock starts when ``run_training`` is called (``budget_start``, or then);
2. after ``on_train_start`` (loaders up), a probe: ``probe_warmup`` + ``probe_iterations`` real training steps on
   live-augmented batches (they train the network: they are SGD steps at the initial learning rate), a few
   ``validation_step`` calls, and a few no-grad forwards of one patch (the final validation's sliding window);
3. ``plan_schedule`` (``bench.budget_schedule``) turns the time left into epochs x iterations per epoch (fewer
   than nnU-Net's 250 per epoch when the budget is short, so that the poly schedule still decays over ~20
   epochs), keeping enough time for ``on_train_end`` and ``perform_actual_validation``;
4. at the start of every epoch the epoch count is re-fitted to the measured epoch times (the poly schedule's
   ``max_steps`` follows), so a wrong probe cannot overrun the budget by much;
5. the final validation (``perform_actual_validation``, inside the budget) runs without test-time mirroring,
   like every arm's held-out prediction: with nnU-Net's 8 mirrored passes per window it alone takes longer than
   a 5-minute budget on 2 cores (measured: 387 s for 2 cases of 64^3-patch windows). It scores only the fold's
   validation cases; the checkpoint, saved before it, is the same either way.

What was decided and measured is in ``self.budget_report`` (JSON-able), also written to
``<fold>/budget_report.json``.
"""

from __future__ import annotations

import json
import os
import time

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from bench.budget_schedule import plan_schedule, sliding_window_tiles, validation_seconds_estimate


class nnUNetTrainerBudget(nnUNetTrainer):
    budget_seconds: float = 300.0
    budget_start: float | None = None   # time.perf_counter() when the budget started (default: run_training's start)
    probe_warmup = 2
    probe_iterations = 4
    probe_val_iterations = 2
    probe_forwards = 2
    validation_mirroring = False       # the final validation's test-time mirroring (nnU-Net: on; see the docstring)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_report: dict = {}
        self.iterations_done = 0
        self._end_reserve = 0.0
        self._epoch_times: list[float] = []

    # ---- measurement -----------------------------------------------------------------------------------------
    def _probe(self) -> dict:
        start = time.perf_counter()
        for _ in range(self.probe_warmup):  # worker start-up, first batches, allocator
            self.train_step(next(self.dataloader_train))
        t0 = time.perf_counter()
        for _ in range(self.probe_iterations):
            self.train_step(next(self.dataloader_train))
        t1 = time.perf_counter()
        self.iterations_done += self.probe_warmup + self.probe_iterations
        with torch.no_grad():
            self.network.eval()
            self.validation_step(next(self.dataloader_val))  # warm-up
            t2 = time.perf_counter()
            for _ in range(self.probe_val_iterations):
                self.validation_step(next(self.dataloader_val))
            t3 = time.perf_counter()
            # the final validation's sliding window: one patch, no deep supervision, no grad
            self.set_deep_supervision_enabled(False)
            patch = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size), device=self.device)
            self.network(patch)
            t4 = time.perf_counter()
            for _ in range(self.probe_forwards):
                self.network(patch)
            t5 = time.perf_counter()
            self.set_deep_supervision_enabled(True)
            self.network.train()
        return {"probe_seconds": t5 - start,
                "seconds_per_iteration": (t1 - t0) / self.probe_iterations,
                "seconds_per_val_iteration": (t3 - t2) / self.probe_val_iterations,
                "seconds_per_forward": (t5 - t4) / self.probe_forwards}

    def _validation_estimate(self, seconds_per_forward: float) -> dict:
        _, val_keys = self.do_split()
        patch = list(self.configuration_manager.patch_size)
        image = [int(round(v)) for v in self.configuration_manager.median_image_size_in_voxels]
        tiles = sliding_window_tiles(image, patch, 0.5)
        axes = (self.inference_allowed_mirroring_axes or ()) if self.validation_mirroring else ()
        flips = 2 ** len(axes)  # nnU-Net predicts every combination of the mirror axes
        return {"val_cases": len(val_keys), "tiles_per_case": tiles, "mirror_passes": flips,
                "seconds": validation_seconds_estimate(len(val_keys), tiles, flips, seconds_per_forward)}

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, without test-time mirroring unless ``validation_mirroring`` (the axes are
        put back afterwards; checkpoint_final.pth, saved before, keeps them)."""
        axes = self.inference_allowed_mirroring_axes
        if not self.validation_mirroring:
            self.inference_allowed_mirroring_axes = None  # nnUNetPredictor: no mirror axes -> one forward per window
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes

    def _elapsed(self) -> float:
        return time.perf_counter() - self.budget_start

    # ---- the loop --------------------------------------------------------------------------------------------
    def run_training(self):
        if self.budget_start is None:
            self.budget_start = time.perf_counter()
        self.on_train_start()
        started = self._elapsed()
        probe = self._probe()
        validation = self._validation_estimate(probe["seconds_per_forward"])
        self._end_reserve = validation["seconds"] + 5.0  # perform_actual_validation + on_train_end (checkpoint, loaders)
        schedule = plan_schedule(self.budget_seconds - self._elapsed() - self._end_reserve,
                                 probe["seconds_per_iteration"], probe["seconds_per_val_iteration"])
        self.num_epochs = schedule.epochs
        self.num_iterations_per_epoch = schedule.iterations_per_epoch
        self.num_val_iterations_per_epoch = schedule.val_iterations_per_epoch
        self.lr_scheduler = PolyLRScheduler(self.optimizer, self.initial_lr, self.num_epochs)
        self.budget_report = {"budget_seconds": self.budget_seconds, "start_seconds": round(started, 3),
                              "probe": probe, "validation_estimate": validation, "schedule": schedule.as_json(),
                              "epoch_count_changes": []}
        self.print_to_log_file(f"budget {self.budget_seconds:.0f} s: probe {probe}, final validation ~"
                               f"{validation['seconds']:.0f} s -> {schedule.as_json()}")

        while self.current_epoch < self.num_epochs:
            if self.current_epoch > 0:
                self._refit_epochs()
                if self.current_epoch >= self.num_epochs:
                    break
            epoch_start = time.perf_counter()
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
            self.iterations_done += self.num_iterations_per_epoch
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            self._epoch_times.append(time.perf_counter() - epoch_start)

        self.on_train_end()
        self.budget_report.update(epochs=self.current_epoch, iterations=self.iterations_done,
                                  epoch_seconds=[round(t, 3) for t in self._epoch_times],
                                  training_seconds=round(self._elapsed(), 3))
        with open(os.path.join(self.output_folder, "budget_report.json"), "w") as f:
            json.dump(self.budget_report, f, indent=2)

    def _refit_epochs(self) -> None:
        """Fit the remaining epochs to the measured epoch time (median of the last few); time left that does not fit
        a whole epoch goes to one last, shorter epoch (at 16 s per iteration, a 20-iteration epoch is 5 minutes: the
        remainder of a 15-minute budget was otherwise left unused)."""
        recent = sorted(self._epoch_times[-5:])
        epoch_seconds = recent[len(recent) // 2]
        left = self.budget_seconds - self._elapsed() - self._end_reserve
        wanted = self.current_epoch + max(0, int(left // epoch_seconds))
        per_iteration = epoch_seconds / max(1, self.num_iterations_per_epoch)
        if wanted == self.current_epoch and left >= 2 * per_iteration:
            shorter = int(left // per_iteration) - 1  # one iteration's time for the epoch's validation and checkpoint
            if shorter >= 1:
                self.budget_report["epoch_count_changes"].append(
                    {"at_epoch": self.current_epoch, "last_epoch_iterations": shorter, "left_seconds": round(left, 1)})
                self.num_iterations_per_epoch = shorter
                wanted = self.current_epoch + 1
        if wanted != self.num_epochs:
            self.budget_report["epoch_count_changes"].append(
                {"at_epoch": self.current_epoch, "from": self.num_epochs, "to": wanted, "epoch_seconds": round(epoch_seconds, 3)})
            self.print_to_log_file(f"budget: epochs {self.num_epochs} -> {wanted} (epoch {epoch_seconds:.1f} s, {left:.0f} s left)")
            self.num_epochs = wanted
            self.lr_scheduler.max_steps = max(wanted, self.current_epoch + 1)
