"""Convert a Medical Segmentation Decathlon task (4D NIfTI) into the nnU-Net v2 raw layout segforge reads.

    python scripts/convert_msd.py path/to/Task01_BrainTumour OUTPUT_ROOT [--id 1]

writes OUTPUT_ROOT/Dataset001_BrainTumour (imagesTr/CASE_000c.nii.gz per channel, labelsTr, imagesTs,
dataset.json); then `segforge check OUTPUT_ROOT/Dataset001_BrainTumour`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from segforge.errors import SegforgeError
from segforge.io.msd import convert_msd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_dir", type=Path, help="a Decathlon task folder, e.g. Task01_BrainTumour")
    parser.add_argument("output_root", type=Path, help="where the DatasetNNN_Name folder is created")
    parser.add_argument("--id", type=int, default=None, help="dataset id (default: the task's number)")
    args = parser.parse_args(argv)
    number = args.id
    if number is None:
        match = re.match(r"Task(\d+)_", args.task_dir.name)
        if not match:
            parser.error("give --id: the task folder's name does not start with TaskNN_")
        number = int(match[1])
    try:
        out = convert_msd(args.task_dir, args.output_root, number)
    except SegforgeError as exc:
        print(f"convert_msd: error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}\nnext: segforge check {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
