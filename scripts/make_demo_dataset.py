#!/usr/bin/env python
"""Write segforge's synthetic demo dataset (nnU-Net raw layout) to a new folder.

    python scripts/make_demo_dataset.py OUT_DIR [--dim 3] [--num-train 24] [--num-test 6] [--seed 0]

The folder must not exist or be empty; it appears complete or not at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from segforge.demo.synthetic import generate_dataset
from segforge.errors import SegforgeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="new (or empty) folder to write the dataset to")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=3, help="3: NIfTI volumes; 2: PNG images")
    parser.add_argument("--num-train", type=int, default=24, help="training cases (imagesTr/labelsTr)")
    parser.add_argument("--num-test", type=int, default=6, help="held-out cases (imagesTs/labelsTs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_dataset(args.out_dir, dim=args.dim, num_train=args.num_train, num_test=args.num_test, seed=args.seed)
    except SegforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {args.num_train} training and {args.num_test} test {args.dim}D cases to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
