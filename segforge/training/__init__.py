"""training: the Lightning module and data module, losses, patch sampling and augmentation, schedules."""
