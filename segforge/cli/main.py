"""The `segforge` command: parse paths and modes, compose the Hydra config, call one stage.

Grammar: `segforge COMMAND [paths and flags] [key=value ...]`. Paths and modes are flags or positionals; every
config value is a Hydra override. Where both could set the same thing, the order of precedence (last wins) is:
config default < environment variable (paths) < flag (e.g. `--work`) < `key=value` override.

Lightning's DDP launcher re-executes this exact command line once per extra rank (and would append `hydra.*`
overrides if Hydra's app state were initialised); `hydra.*` overrides are accepted and ignored, and every rank
derives the same run folder from the config, never from the clock.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from segforge import __version__
from segforge.configs import CONFIG_DIR
from segforge.errors import SegforgeError

COMMANDS = {
    "check": "List every problem of a training dataset (exit 0 when clean).",
    "plan": "Check, fingerprint and plan a dataset (and preprocess it unless preprocess.run=false).",
    "preprocess": "Crop, normalise and resample the training cases as a plan (plans_<name>.json, plans=<name>) says.",
    "train": "Train one fold of one configuration (Lightning; DDP-ready).",
    "predict": "Predict masks for a folder of images with a trained model folder.",
    "sample": "Generate images with a trained denoising model (task=denoise); with --masks, one per label map.",
    "denoise": "Denoise images with a trained denoising model (task=denoise) by entering its reverse process at their noise level.",
    "evaluate": "Dice, IoU, HD95 and NSD per case and class between a prediction and a reference folder.",
    "report": "A self-contained HTML page of an evaluated prediction folder or a fold folder: metrics table, overlays, curves.",
    "select": "Compare configurations of every plan (and their ensembles) on cross-validation, pick the best, find its postprocessing.",
    "export-model": "Pack a model folder (plans, weights of chosen folds, postprocessing, checksums) into one zip.",
    "import-model": "Check a model zip against its checksums and unpack it as a model folder.",
    "demo": "Generate a synthetic dataset and run check, plan, preprocess, train, predict and evaluate on it.",
}


CONFIG_OF = {"export-model": "model_archive", "import-model": "model_archive"}  # commands that share a config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segforge",
        description="Self-configuring biomedical image segmentation. Every config value is a `key=value` override.",
        epilog="Examples: segforge plan data/Dataset001_X plan.gpu_memory_gb=24 | "
        "segforge train data/Dataset001_X trainer.max_epochs=50 fold=1 | "
        "segforge predict -i imgs/ -o out/ --model WORK/Dataset001_X/results/segment/3d_fullres",
    )
    parser.add_argument("--version", action="version", version=f"segforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text + " Trailing key=value pairs override the config.")
        if name in ("check", "plan", "preprocess", "train"):
            p.add_argument("dataset", help="dataset folder (nnU-Net raw layout), or a name/id under paths.raw_root")
        if name == "predict":
            p.add_argument("-i", "--input", required=True, help="folder of images (CASE_0000.ext, ...) or one image file")
            p.add_argument("-o", "--output", required=True, help="folder for the predicted masks")
            p.add_argument("--model", required=True, action="append",
                           help="trained model folder (holds plans.json and fold_*/); repeat to ensemble configurations")
            p.add_argument("--continue", dest="resume", action="store_true",
                           help="skip cases whose output already exists (outputs are written atomically)")
            p.add_argument("--part", default=None, metavar="K/N",
                           help="predict only part K of N (every N-th case from the K-th): for parallel jobs or a SLURM array")
            p.add_argument("--save-probabilities", action="store_true",
                           help="also write CASE.npz (float16 probabilities on the input's grid) and CASE.probabilities.json")
        if name in ("sample", "denoise"):
            p.add_argument("--model", required=True, help="model folder of a `segforge train DATASET task=denoise` run")
            p.add_argument("-o", "--output", required=True, help="folder for the images written")
        if name == "sample":
            p.add_argument("--masks", default=None,
                           help="folder of label maps (CASE<ending>) or one map: a mask-conditioned model synthesises "
                                "one image per map, on the map's grid")
            p.epilog = ("e.g. segforge sample --model MODEL_DIR -o out/ n=8 steps=50 sampler=ddim seed=0 "
                        "(shape=[z,y,x] or [y,x]; default: the plan's median image)")
        if name == "denoise":
            p.add_argument("-i", "--input", required=True, help="folder of noisy images (CASE_0000.ext, ...) or one image file")
            p.epilog = ("e.g. segforge denoise --model MODEL_DIR -i noisy/ -o out/ sigma=0.1 [steps=1]. sigma is the noise "
                        "standard deviation as a fraction of the image's intensity range (max - min of the clean image; "
                        "intensity_range=[low,high] states it, otherwise it is estimated from the noisy image); "
                        "sigma_units=intensity takes sigma in the image's own intensity units")
        if name == "evaluate":
            p.add_argument("pred_dir", help="folder of predicted masks")
            p.add_argument("ref_dir", help="folder of reference masks")
            p.add_argument("--dataset-json", help="dataset.json giving the labels (default: beside ref_dir or pred_dir)")
        if name == "report":
            p.add_argument("path", help="a prediction folder with its summary.json (segforge evaluate), or a fold folder "
                                        "(<results>/segment/<configuration>/fold_k)")
            p.add_argument("-o", "--output", help="the HTML file to write (default: PATH/report.html)")
        if name == "export-model":
            p.add_argument("model_dir", help="trained model folder (holds plans.json and fold_*/)")
            p.add_argument("archive", help="the zip to write (never overwritten)")
            p.add_argument("--folds", nargs="+", help="only these folds (default: every trained fold)")
        if name == "import-model":
            p.add_argument("archive", help="a zip written by segforge export-model")
            p.add_argument("destination", help="the model folder to create (must not exist)")
        if name == "select":
            p.add_argument("task_dir", help="<results>/<dataset>/results/<task>: the folder holding one model folder per configuration "
                                               "and plan (<configuration>, <configuration>__<plans>)")
        if name == "train":
            p.add_argument("-m", "--multirun", action="store_true",
                           help="one run per combination of comma-separated values, through Hydra's launcher: "
                                "fold=0,1,2,3,4 configuration=3d_fullres,2d (hydra/launcher=slurm: one SLURM job each)")
        if name == "plan":
            p.add_argument("--verify", action="store_true",
                           help="on a CUDA machine: run each planned training step and report predicted vs measured peak memory")
        if name == "demo":
            p.add_argument("--out", help="folder for the demo dataset and work root (default: ./segforge_demo)")
        if name != "demo":
            p.add_argument("--work", help="work root (same as paths.work_root=...; default $SEGFORGE_WORK or ./segforge_work)")
        p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
        p.set_defaults(overrides=[])
    return parser


def compose_config(config_name: str, overrides: list[str]):
    """The composed config of one command; Hydra's own errors become user errors."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from omegaconf import OmegaConf

    from segforge.cli.moved_keys import moved_key_error

    moved = moved_key_error(overrides)  # e.g. optim.lr=...: now optim.optimizer.lr
    if moved:
        raise SegforgeError(moved)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=config_name):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.to_container(cfg, resolve=True)  # an interpolation that cannot resolve fails now, not mid-run
        return cfg
    except (HydraException, OmegaConfBaseException) as exc:
        raise SegforgeError(suggestion(exc, overrides, config_name) or override_error(exc, overrides)) from exc


def config_keys(config) -> list[str]:
    """Every dotted key of a composed config (its leaves and the sections above them)."""
    from omegaconf import DictConfig

    keys = []
    for name in config.keys():
        keys.append(str(name))
        value = config._get_node(name)
        if isinstance(value, DictConfig):
            keys += [f"{name}.{sub}" for sub in config_keys(value)]
    return keys


def suggestion(exc: Exception, overrides: list[str], config_name: str) -> str | None:
    """For an override whose key does not exist (a typo: ``trainer.max_epoch=5``) or whose group option does not
    (``optim=sgd_polly``), one line naming the closest existing key or option; None for any other error."""
    import difflib
    import re

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    text = str(exc)
    missing = re.search(r"Could not override '([^']+)'", text)
    option = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        key = missing.group(1)
        from hydra import compose, initialize_config_dir

        others = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]  # e.g. task=denoise: its keys
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=config_name):
            try:
                keys = config_keys(compose(config_name=config_name, overrides=others))
            except (HydraException, OmegaConfBaseException):
                keys = config_keys(compose(config_name=config_name))
        parent = key.rpartition(".")[0]
        siblings = [k for k in keys if k.rpartition(".")[0] == parent]  # a typo of the last part first
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
        value = given.split("=", 1)[1] if "=" in given else "VALUE"
        hint = f"did you mean {close[0]}? Fix: {close[0]}={value}" if close else \
            "Fix: correct the key (`--cfg job` prints every setting)"
        return f"bad override {given}: there is no setting {key}; {hint} (a new key of your own needs a leading +: +{key}={value})"
    if option:
        group, name = option.groups()
        available = re.findall(r"^\t?\s*([\w.-]+)$", text.split("Available options", 1)[-1], re.M)
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
        given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == group), f"{group}={name}")
        return (f"bad override {given}: {group} has no option {name!r} (options: {', '.join(available)})"
                + (f"; did you mean {close[0]}? Fix: {group}={close[0]}" if close else ". Fix: choose one of them"))
    return None


def override_error(exc: Exception, overrides: list[str]) -> str:
    """One line naming the override Hydra or OmegaConf refused, what is wrong and the fix."""
    key = str(getattr(exc, "full_key", None) or "")
    text = str(getattr(exc, "msg", None) or exc).split("\nConfig search path")[0]  # Hydra's search path says nothing to a user
    detail = "; ".join(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
        ("full_key:", "object_type=", "reference_type=")))
    named = [o for o in overrides if (key and o.lstrip("+~").split("=", 1)[0] == key) or
             (not key and f"'{o.lstrip('+~').split('=', 1)[0]}'" in text) or o in text]
    if "Interpolation" in type(exc).__name__ or "interpolation" in text.lower():
        fix = ("set the environment variable, or give a default: ${oc.env:NAME,DEFAULT}" if "Environment variable" in text
               else "refer to a setting that exists (`--cfg job` prints them)")
    else:
        fix = "correct it (`--cfg job` prints every setting; a new key needs a leading +)"
    where = named[0] if named else (key or ", ".join(overrides) or "the config")
    return f"bad override {where}: {detail}. Fix: {fix}"


def split_overrides(args: argparse.Namespace) -> list[str]:
    """User overrides with flags translated in front; a single run drops Hydra's own (`hydra.*`, appended by
    relaunchers), a sweep (``-m``) keeps them: they set its launcher (checked by ``check_hydra_targets``)."""
    bad = [o for o in args.overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise SegforgeError(f"unexpected argument(s) {bad}: config overrides are written key=value (see --help)")
    flags = [f"paths.work_root={args.work}"] if getattr(args, "work", None) else []
    if getattr(args, "out", None):
        flags.append(f"out={args.out}")
    user = [o for o in args.overrides
            if getattr(args, "multirun", False) or not o.lstrip("+~").startswith("hydra.")]
    return flags + user


def implied_overrides(command: str, overrides: list[str]) -> list[str]:
    """``segforge train ... budget=15m`` brings the recipe made for few steps (``recipe=budget``) unless a recipe is
    given: ``recipe=nnunet budget=15m`` keeps nnU-Net's recipe inside the same budget."""
    values = {o.lstrip("+~").split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o}
    if command == "train" and values.get("budget", "null").lower() not in ("null", "none", "") and "recipe" not in values:
        return ["recipe=budget", *overrides]
    return overrides


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name that is not UTF-8 (held by Python as surrogates) shown as \\udcXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _PrintableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (callers and test runners may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def configure_logging() -> None:
    """segforge's messages to stderr, once; third-party noise that says nothing to a user is filtered."""
    import warnings

    logger = logging.getLogger("segforge")
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(_PrintableFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # Lightning logs this at every checkpoint save; segforge saves full training state on purpose (resume needs it)
    connector_log = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    if not any(isinstance(f, _DropMessage) for f in connector_log.filters):
        connector_log.addFilter(_DropMessage("`weights_only` was not set"))
    for pattern in (".*LeafSpec.*", ".*all_gather is deprecated.*", ".*number of training batches.*logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()  # a training budget counts from here (imports of torch and Lightning included)
    parser = build_parser()
    # overrides (key=value) may stand anywhere after the command; argparse leaves them over
    args, rest = parser.parse_known_args(argv)
    args.started_at = started_at
    args.entry_point = main  # what a command that runs others (demo) calls: no command imports this module back
    if args.command:
        args.overrides = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.command:
        parser.print_help()
        return 1
    configure_logging()
    try:
        overrides = implied_overrides(args.command, split_overrides(args))
        if getattr(args, "multirun", False) and not args.cfg:
            from segforge.cli.moved_keys import moved_key_error
            from segforge.cli.multirun import run_multirun

            if moved_key_error(overrides):
                raise SegforgeError(moved_key_error(overrides))

            return run_multirun(str(CONFIG_DIR), CONFIG_OF.get(args.command, args.command), overrides,
                                lambda cfg, job_overrides: run_command(args, cfg, job_overrides))
        return run_command(args, compose_config(CONFIG_OF.get(args.command, args.command), overrides), overrides)
    except SegforgeError as exc:
        print(printable(f"segforge {args.command}: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a write the stage did not foresee failing: full disk, quota, read-only, permissions
        from segforge.io.storage import storage_error

        error = storage_error(exc, exc.filename or "a file")
        if error is None:
            raise
        print(printable(f"segforge {args.command}: error: {error}"), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"segforge {args.command}: interrupted", file=sys.stderr)
        return 130


def run_command(args, cfg, overrides: list[str]) -> int:
    """One command on its composed config: the config's ``_target_``s and the folders checked, then the stage."""
    from segforge.cli.targets import check_targets

    check_targets(cfg, CONFIG_DIR)  # a `_target_` typed on the command line names no arbitrary callable
    if args.cfg:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    from segforge.cli import commands, plan_commands
    from segforge.cli.folder_kinds import check_arguments, resolve_model_folders

    if args.command == "predict":  # a results/<task> folder with configuration= [plans=]: its model folder
        from pathlib import Path

        args.model = [str(p) for p in resolve_model_folders([Path(m) for m in args.model], cfg.get("configuration"),
                                                              cfg.get("plans"))]
    check_arguments(args.command, args)  # a model folder given to train, a dataset to --model: say which command
    module = plan_commands if args.command in ("plan", "preprocess") else commands
    return int(getattr(module, f"run_{args.command.replace('-', '_')}")(args, cfg, overrides) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
