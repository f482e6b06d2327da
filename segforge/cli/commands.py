"""One thin function per `segforge` command: resolve paths, call the layers, save the composed config
(`plan` and `preprocess`: ``plan_commands.py``)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from segforge.cli.dataset_args import _refuse_unlabelled, labels_wanted, save_config, task_name
from segforge.errors import SegforgeError
from segforge.io.artifacts import read_json, write_json
from segforge.io.dataset import load_dataset
from segforge.workspace import BUDGET_CONFIGURATIONS, DEFAULT_PLANS, Workspace, check_not_inside, resolve_dataset

log = logging.getLogger("segforge")


def run_check(args, cfg, overrides) -> int:
    from segforge.io.checks import check_dataset, format_problems

    root = resolve_dataset(args.dataset, cfg.paths.raw_root)
    if cfg.get("require_labels") is None:
        _refuse_unlabelled(root, cfg)
    problems = check_dataset(root, require_labels=labels_wanted(cfg, root), num_workers=int(cfg.get("num_workers") or 0))
    if problems:
        print(format_problems(problems, root), file=sys.stderr)
        return 1
    print(f"{root}: no problems found")
    return 0



def run_train(args, cfg, overrides) -> int:
    from segforge.training.run import train

    # layout only: every DDP rank runs this, and the files were checked by `plan`
    root = resolve_dataset(args.dataset, cfg.paths.raw_root)
    _refuse_unlabelled(root, cfg)
    spec = load_dataset(root, require_labels=labels_wanted(cfg, root))
    ws = Workspace.from_config(cfg.paths, spec.name)
    for folder, setting in ((ws.work_dir, "work_root"), (ws.preprocessed_dir, "preprocessed_root"),
                            (ws.results_dir, "results_root")):  # splits.json, the data read, the run folder
        check_not_inside(folder, spec.root, "dataset folder", fix=f"set paths.{setting}=DIR to a folder outside it")
    fold_dir = train(cfg, spec, overrides, started_at=getattr(args, "started_at", None))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"model folder: {fold_dir.parent}\nrun folder:   {fold_dir}")
        if task_name(cfg) == "segment" and (fold_dir / "validation" / "summary.json").is_file():  # what report reads
            print(f"report:       segforge report {fold_dir}")
    return 0


def run_predict(args, cfg, overrides) -> int:
    from segforge.inference.cascade import Cascade, pair_stages
    from segforge.inference.folder import parse_part, predict_folder
    from segforge.inference.postprocessing import apply_postprocessing, load_rules
    from segforge.inference.predictor import Ensemble, Predictor
    from segforge.inference.sliding_window import check_step_size

    input_path, output = Path(args.input), Path(args.output)
    if not input_path.exists():
        raise SegforgeError(f"{input_path}: input not found")
    if input_path.is_dir() and output.resolve() == input_path.resolve():
        raise SegforgeError(f"{output}: output folder is the input folder. Fix: choose another -o folder")
    parse_part(args.part)  # a malformed --part fails before any model is loaded
    from segforge.inference.output_folder import check_output_folder, is_prediction_folder, release_unused
    from segforge.io.storage import check_writable

    check_output_folder(output)  # never a dataset's folder, nor one holding files segforge did not write
    check_writable(output, what="prediction", setting="-o OUT", create=False)  # an unwritable -o fails before any model is loaded
    folds = list(cfg.predict.folds) if cfg.predict.folds is not None else None
    predictors = [Predictor.from_model_dir(model, folds=folds, device=cfg.predict.device, step_size=check_step_size(cfg.predict.step_size),
                                           mirror=bool(cfg.predict.mirror), sw_batch_size=int(cfg.predict.sw_batch_size),
                                           accumulate=str(cfg.predict.accumulate),
                                           gaussian_sigma=float(cfg.predict.gaussian_sigma),
                                           gaussian_centre_weight=float(cfg.predict.gaussian_centre_weight))
                  for model in args.model]
    for model, loaded in zip(args.model, predictors):  # which plan each model was trained from (plans.json records it)
        trained_from = loaded.plans.get("plans_name", DEFAULT_PLANS)
        if cfg.get("plans") is not None and str(cfg.plans) != trained_from:
            raise SegforgeError(f"{model}: was trained from plans {trained_from}, not plans={cfg.plans}. Fix: pass the "
                                f"model folder of plans {cfg.plans} (<configuration>__{cfg.plans}), or drop plans=")
        log.info("model %s: configuration %s of plans %s", model, loaded.configuration, trained_from)
    sources = [Path(m) for m in args.model]
    members = pair_stages(predictors, sources)  # a cascade stage and its previous stage's model become one member
    wanted = cfg.get("configuration")
    for member in members if wanted is not None else []:
        if member.configuration != wanted and not (wanted == "budget" and member.configuration in BUDGET_CONFIGURATIONS):
            stage = member.stage if isinstance(member, Cascade) else member
            raise SegforgeError(f"{sources[predictors.index(stage)]}: is a model of configuration "
                                f"{member.configuration}, not configuration={wanted}. Fix: pass the model folder of "
                                f"{wanted} (or its results/<task> folder with configuration={wanted}), or drop "
                                "configuration=")
    predictor = members[0] if len(members) == 1 else Ensemble(members)
    postprocess = None
    # one model (or one cascade: its last stage's rules)
    single = sources[predictors.index(members[0].stage)] if len(members) == 1 and isinstance(members[0], Cascade) \
        else sources[0] if len(sources) == 1 else None
    rules = load_rules(single) if single is not None and cfg.predict.postprocessing else None
    if rules:
        log.info("postprocessing from %s: %s", single / "postprocessing.json",
                 {k: rules[k] for k in ("foreground_largest_component", "classes_largest_component")})
        postprocess = functools.partial(apply_postprocessing, rules=rules)
    existed, fresh = output.exists(), not is_prediction_folder(output)
    save_config(output, "predict", cfg, overrides)  # before the first mask: it marks the folder as segforge's
    try:
        results = predict_folder(predictor, input_path, output, resume=args.resume, part=args.part,
                                 with_probabilities=args.save_probabilities, postprocess=postprocess,
                                 overlap=bool(cfg.predict.overlap))
    except SegforgeError:
        if fresh:  # refused before any case (e.g. no images): nothing left behind
            release_unused(output, existed)
        raise
    write_json(output / "dataset.json", predictor.dataset_json)
    counts = {s: sum(r.status == s for r in results) for s in ("written", "skipped", "failed")}
    print(f"{output}: {counts['written']} mask(s) written, {counts['skipped']} already there, {counts['failed']} failed")
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.case_id}: {r.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _generation(args, cfg, command: str):
    """The denoising model of `sample`/`denoise`, after the output folder proved safe to write and writable."""
    from segforge.inference.generate import DenoisingModel
    from segforge.inference.output_folder import check_output_folder
    from segforge.io.storage import check_writable

    # never a dataset's folder, nor one holding images this command did not write (they would be replaced)
    check_output_folder(Path(args.output), marker=f"{command}_config.yaml")
    check_writable(Path(args.output), what="generated images", setting="-o OUT", create=False)
    gen = cfg.generate
    return DenoisingModel.from_model_dir(Path(args.model), fold=gen.fold, device=str(gen.device))


def _report(output: Path, results, what: str) -> int:
    counts = {s: sum(r.status == s for r in results) for s in ("written", "failed")}
    print(f"{output}: {counts['written']} {what} written, {counts['failed']} failed")
    for r in results:
        if r.status == "failed":
            print(f"  failed: {r.case_id}: {r.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def run_sample(args, cfg, overrides) -> int:
    from segforge.inference.generate import sample_from_masks, sample_images
    from segforge.inference.sliding_window import check_step_size

    model = _generation(args, cfg, "sample")
    output, gen = Path(args.output), cfg.generate
    common = dict(steps=cfg.steps, sampler=cfg.sampler, seed=int(cfg.seed),
                  step_size=check_step_size(gen.step_size, "generate.step_size"),
                  sw_batch_size=int(gen.sw_batch_size))
    if args.masks:
        if not Path(args.masks).exists():
            raise SegforgeError(f"{args.masks}: --masks not found")
        results = sample_from_masks(model, Path(args.masks), output, guidance_scale=float(cfg.guidance_scale), **common)
        code = _report(output, results, "image(s)")
    else:
        shape = list(cfg.shape) if cfg.shape is not None else None
        written = sample_images(model, output, int(cfg.n), shape=shape, **common)
        print(f"{output}: {len(written)} image file(s) written")
        code = 0
    save_config(output, "sample", cfg, overrides)
    return code


def run_denoise(args, cfg, overrides) -> int:
    from segforge.inference.generate import denoise_folder
    from segforge.inference.sliding_window import check_step_size

    if Path(args.input).exists() and Path(args.output).resolve() == Path(args.input).resolve():
        raise SegforgeError(f"{args.output}: output folder is the input folder (inputs are never overwritten). "
                            "Fix: choose another -o folder")
    model = _generation(args, cfg, "denoise")
    gen = cfg.generate
    intensity_range = list(cfg.intensity_range) if cfg.intensity_range is not None else None
    results = denoise_folder(model, Path(args.input), Path(args.output), float(cfg.sigma), str(cfg.sigma_units),
                             intensity_range, int(cfg.steps), cfg.sampler, int(cfg.seed),
                             check_step_size(gen.step_size, "generate.step_size"),
                             int(gen.sw_batch_size), list(cfg.range_percentiles))
    save_config(Path(args.output), "denoise", cfg, overrides)
    return _report(Path(args.output), results, "denoised case(s)")


def check_summary_replaceable(path: Path) -> None:
    """``evaluate`` writes ``summary.json`` beside the predictions: never over one that segforge did not write (e.g.
    nnU-Net's own in its validation folder, or a file of a dataset's when the two folders are swapped)."""
    if not path.exists():
        return
    try:
        ours = json.loads(path.read_text()).get("kind") == "summary"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise SegforgeError(f"{path}: exists and was not written by `segforge evaluate`; evaluating would replace it. "
                            "Fix: move it away, or evaluate a copy of the predictions in another folder")


def run_evaluate(args, cfg, overrides) -> int:
    from segforge.evaluation.metrics import evaluate_folders, format_summary

    pred_dir, ref_dir = Path(args.pred_dir), Path(args.ref_dir)
    candidates = [Path(args.dataset_json)] if args.dataset_json else [pred_dir / "dataset.json", ref_dir.parent / "dataset.json"]
    labels = OmegaConf.to_container(cfg.labels) if cfg.labels else None
    for candidate in candidates:
        if labels is None and candidate.is_file():
            labels = read_json(candidate)["labels"]
    if labels is None:
        raise SegforgeError(f"no labels: none of {[str(c) for c in candidates]} exists. Fix: --dataset-json PATH")
    check_summary_replaceable(pred_dir / "summary.json")
    summary = evaluate_folders(pred_dir, ref_dir, labels, pred_dir / "summary.json", float(cfg.nsd_tolerance_mm),
                               bool(cfg.surface_metrics), float(cfg.geometry_tolerance))
    print(format_summary(summary))
    print(f"summary: {pred_dir / 'summary.json'}\nreport:  segforge report {pred_dir}   (writes {pred_dir / 'report.html'})")
    return 0


def run_select(args, cfg, overrides) -> int:
    from segforge.evaluation.selection import select

    plans = cfg.get("plans")
    plans = None if plans is None else [str(plans)] if isinstance(plans, (str, int)) else [str(p) for p in plans]
    result = select(Path(args.task_dir), postprocessing=bool(cfg.postprocessing), plans=plans)
    for name, dice in sorted(result["cross_validation_dice"].items(), key=lambda kv: -kv[1]):
        described = result["candidates"][name]
        print(f"  {described:<48} cross-validation Dice {dice:.4f}{'   <- best' if name == result['best'] else ''}")
    if "postprocessing" in result:
        print(f"postprocessing: {result['postprocessing']}")
    print(f"selection: {Path(args.task_dir) / 'selection.json'}\npredict with: {result['predict_command']}")
    return 0


def run_export_model(args, cfg, overrides) -> int:
    from segforge.io.model_archive import export_model

    from segforge.evaluation.selection import with_previous_stages

    model_dir = Path(args.model_dir)
    manifest = export_model(model_dir, Path(args.archive), args.folds)
    size = Path(args.archive).stat().st_size
    print(f"{args.archive}: {len(manifest['files'])} files of {manifest['model']} ({', '.join(manifest['folds'])}), "
          f"{size / 2**20:.1f} MB")
    folders = with_previous_stages(model_dir.parent, [model_dir.name])  # [previous stage's, this] for a cascade stage
    if len(folders) > 1:  # it predicts only after its previous stage: that model travels in its own archive
        lowres = model_dir.parent / folders[0]
        print(f"note: {model_dir.name} is a cascade stage; it predicts after its {lowres.name} model. Export that too: "
              f"segforge export-model {lowres} {Path(args.archive).with_name(lowres.name + '.zip')}; then predict with "
              f"--model <{lowres.name} folder> --model <this folder>")
    return 0


def run_import_model(args, cfg, overrides) -> int:
    from segforge.io.model_archive import import_model

    folder = import_model(Path(args.archive), Path(args.destination), cfg.max_expansion, cfg.max_bytes)
    print(f"model folder: {folder}\npredict with: segforge predict -i IMAGES -o OUT --model {folder}")
    return 0


def run_demo(args, cfg, overrides) -> int:
    from segforge.cli.demo import run_demo as demo

    return demo(cfg, overrides, args.entry_point)


def run_report(args, cfg, overrides) -> int:
    from segforge.evaluation.report import write_report

    max_cases = None if cfg.max_cases is None else int(cfg.max_cases)
    print(f"report: {write_report(Path(args.path), args.output and Path(args.output), max_cases, int(cfg.max_slice_px))}")
    return 0
