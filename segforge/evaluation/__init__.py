"""evaluation: per-case, per-class metrics and their summary.json."""
