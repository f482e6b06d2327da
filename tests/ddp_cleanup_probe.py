"""`python tests/ddp_cleanup_probe.py train ...` is `segforge train ...` in which every DDP rank, as soon as the
stale-temporary clean-up (``remove_stale_temporaries``, called by training/run.py) returns to it, starts writing a
temporary of its own in the fold folder, ``.tmp-live-rank<R>``, and renames it to ``live-rank<R>`` when training
ends. Rank 1 reaches its clean-up 2 s after rank 0: a clean-up that ran on every rank, or without holding the
others until it is done, deletes rank 0's live temporary and rank 0's rename fails.

Lightning starts the second rank by running this script again with the same arguments, so both ranks carry it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import segforge.training.run as run
from segforge.cli.main import main
from segforge.training.module import SegmentationModule

RANK = int(os.environ.get("LOCAL_RANK", "0"))  # one node: Lightning's launcher sets it for the ranks it starts
clean = run.remove_stale_temporaries
live: list[Path] = []


def late_clean_then_write(folder, *args, **kwargs):
    if RANK == 1:
        time.sleep(2.0)
    clean(folder, *args, **kwargs)
    temporary = Path(folder) / f".tmp-live-rank{RANK}"
    temporary.write_text("being written")
    live.append(temporary)


def finish_writing(self) -> None:
    for temporary in live:
        os.replace(temporary, temporary.with_name(temporary.name.removeprefix(".tmp-")))


run.remove_stale_temporaries = late_clean_then_write
SegmentationModule.on_train_end = finish_writing

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
