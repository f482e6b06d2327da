"""training: one run (``run``), the Lightning modules of both tasks and the data module, losses, patch sampling and
augmentation, schedules and budgets, callbacks, and each task's final validation. May import inference."""
