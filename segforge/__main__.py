"""`python -m segforge` is the `segforge` command (Lightning's DDP launcher re-executes it this way)."""

from segforge.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
