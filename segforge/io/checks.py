"""Check a training dataset's files and list every problem at once: layout, readability, geometry, values, location.

``check_dataset`` first runs ``scan_dataset`` (dataset.json and the layout on disk), then reads the training cases
one at a time (memory stays bounded by one case) and checks each file:

* it can be read completely (a truncated NIfTI is caught even though SimpleITK zero-fills it silently) and is 2D/3D,
  with the same dimensionality as the rest of the dataset;
* the channels of a case and its label share one voxel grid (size, spacing, origin, direction);
* label values are declared in dataset.json, integer and non-negative; images and labels hold no NaN/inf
  (counted in the file: SimpleITK's NIfTI reader silently turns them into 0);
* its real path (symlinks followed) lies inside the dataset folder or under an allowed data root.

User errors never raise: each becomes a ``Problem`` naming the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from segforge.io.dataset import Case, DatasetSpec, Problem, inside, scan_dataset
from segforge.io.image import GEOMETRY_TOL, Geometry, ImageReadError, float32_overflow, read_image

MAX_LISTED = 10  # values shown per problem before "..."
# raise with every new rule here: a dataset a check of another version passed is read again (``check_signature``)
CHECK_VERSION = 1
REEXPORT_FIX = "re-export the file from the original data (the copy may have been interrupted)"


# below this many bytes of case files the cases are read in this process: a pool's start (its workers import
# SimpleITK and nibabel, about 0.5 s) costs more than reading them
PARALLEL_MIN_BYTES = 32 * 2**20


def check_dataset(root: Path, require_labels: bool = True, progress: bool = False, *,
                  allowed_roots: list[Path] | None = None, env_root: bool = True, num_workers: int = 0) -> list[Problem]:
    """Every problem of the dataset at ``root`` (empty when it is fit for planning and training).

    ``allowed_roots``: folders outside the dataset that its files (through symlinks) may live in; with
    ``env_root`` (the default) the folder in ``$SEGFORGE_RAW``, if set, is allowed too. ``progress`` prints a
    case counter on stderr. ``num_workers`` > 1 reads the cases in that many processes (each file is read whole:
    on 100 CT-like cases of 244 MB, 3.7 s in one process), once they hold ``PARALLEL_MIN_BYTES`` or more.
    """
    from segforge.parallel import progress_map

    root = Path(root)
    spec, problems = scan_dataset(root, require_labels)
    if spec is None:
        return problems
    already = {p.path for p in problems}  # files scan_dataset reported (missing, outside): not read again
    roots = _allowed_roots(allowed_roots, env_root)
    workers = int(num_workers) if int(num_workers) > 1 and _case_bytes(spec) >= PARALLEL_MIN_BYTES else 0
    ndims: list[tuple[str, int]] = []
    cases = progress_map(_check_case, [(root, spec, case, roots, already) for case in spec.cases], workers, "check")
    for i, (case_problems, case_ndims) in enumerate(cases, 1):
        problems += case_problems
        ndims += case_ndims
        if progress:
            print(f"\rchecked {i}/{len(spec.cases)} case(s)", end="\n" if i == len(spec.cases) else "",
                  file=sys.stderr, flush=True)
    problems += _dimension_problems(ndims)
    return problems


def check_signature(spec: DatasetSpec, allowed_roots: list[Path] | None = None, env_root: bool = True) -> str | None:
    """What a passing check vouches for, so that a later command may skip reading the images of unchanged files:
    dataset.json, and every case file and every data file an .mhd/.nhdr header there names, as the file system has
    them (a symlink and its target, the file's device, inode, size, mtime and ctime: ``touch -r``, ``cp -p`` and
    ``rsync -t`` cannot set a ctime back), the allowed data roots, ``CHECK_VERSION`` and segforge's version. None
    when a file cannot be looked at (the check reads it and says why)."""
    import hashlib

    from segforge import __version__
    from segforge.io.header_checks import detached_data_file

    root = Path(spec.root)
    digest = hashlib.sha256(f"{CHECK_VERSION}|{__version__}|{_allowed_roots(allowed_roots, env_root)}\n"
                            .encode("utf-8", "surrogateescape"))
    files = [root / "dataset.json"]
    for case in spec.cases:
        for path in [*case.image_files, *([case.label_file] if case.label_file else [])]:
            files.append(Path(path))
            if str(path).lower().endswith((".mhd", ".nhdr")):
                data = detached_data_file(Path(path))
                if data is not None:
                    files.append(data)
    try:
        for path in files:
            link = os.readlink(path) if os.path.islink(path) else ""
            facts = os.stat(path)
            # names as the file system has them: bytes that are no UTF-8 (surrogate escapes) are valid names
            digest.update(f"{os.path.relpath(path, root)}|{link}|{os.path.realpath(path)}|{facts.st_dev}|"
                          f"{facts.st_ino}|{facts.st_size}|{facts.st_mtime_ns}|{facts.st_ctime_ns}\n"
                          .encode("utf-8", "surrogateescape"))
    except OSError:
        return None
    return digest.hexdigest()


def layout_problems(spec: DatasetSpec, allowed_roots: list[Path] | None = None, env_root: bool = True) -> list[Problem]:
    """The checks that read no image: every case file's real path inside the dataset or an allowed root."""
    roots = _allowed_roots(allowed_roots, env_root)
    return [problem for case in spec.cases
            for path in [*case.image_files, *([case.label_file] if case.label_file else [])]
            for problem in _location_problems(Path(spec.root), Path(path), roots)]


def _case_bytes(spec: DatasetSpec) -> int:
    total = 0
    for case in spec.cases:
        for path in [*case.image_files, *([case.label_file] if case.label_file else [])]:
            try:
                total += path.stat().st_size
            except OSError:  # missing or unreadable: the case check reports it
                pass
    return total


def format_problems(problems: list[Problem], dataset: str | os.PathLike = "the dataset") -> str:
    """The problems as the CLI prints them: a header line, then each problem with its fix."""
    return "\n".join([f"{len(problems)} problem(s) in {dataset}"] + [str(p) for p in problems])


def _allowed_roots(allowed_roots: list[Path] | None, env_root: bool) -> list[Path]:
    roots = [Path(r).expanduser() for r in (allowed_roots or [])]
    if env_root and os.environ.get("SEGFORGE_RAW"):
        roots.append(Path(os.environ["SEGFORGE_RAW"]).expanduser())
    return [Path(os.path.realpath(r)) for r in roots]


def _check_case(root: Path, spec: DatasetSpec, case: Case, roots: list[Path],
                already: set[str]) -> tuple[list[Problem], list[tuple[str, int]]]:
    """Problems of one case's files, and each image's (path, dimensions); reads one file at a time and keeps only
    the reference grid."""
    problems: list[Problem] = []
    ndims: list[tuple[str, int]] = []
    ref: tuple[Path, tuple, Geometry] | None = None  # first readable channel: what the others must match
    for path in case.image_files:
        got = _read(root, path, roots, already, problems)
        if got is None:
            continue
        array, geometry = got
        ndims.append((str(path), geometry.ndim))
        problems += _nonfinite_problems(path, array)
        overflow = float32_overflow(path, array)
        if overflow:
            problems.append(_problem_from_error(path, ImageReadError(overflow)))
        if ref is None:
            ref = (path, array.shape, geometry)
        else:
            problems += _grid_problems(path, array.shape, geometry, ref, "channel",
                                       "resample all channels of a case onto one voxel grid")
        del array
    if case.label_file is not None:
        got = _read(root, case.label_file, roots, already, problems)
        if got is not None:
            label, geometry = got
            if ref is not None:
                problems += _grid_problems(case.label_file, label.shape, geometry, ref, "label",
                                           "export the label on its image's voxel grid (same size, spacing, "
                                           "origin and direction), e.g. resample it with nearest-neighbour")
            problems += _label_problems(case.label_file, label, spec)
    return problems, ndims


def _read(root: Path, path: Path, roots: list[Path], already: set[str],
          problems: list[Problem]) -> tuple[np.ndarray, Geometry] | None:
    """The file's array and geometry, or None after appending why it cannot be used."""
    if str(path) in already or not inside(root, path):
        return None  # scan_dataset has reported it
    problems += _location_problems(root, path, roots)
    try:
        return read_image(path, data_roots=roots)
    except ImageReadError as exc:
        problems.append(_problem_from_error(path, exc))
    except Exception as exc:  # a reader's own failure mode: still a problem with this file, never a crash
        problems.append(Problem(str(path), f"cannot read image ({type(exc).__name__}: {exc})", REEXPORT_FIX))
    return None


def _problem_from_error(path: Path, exc: Exception) -> Problem:
    """Split an ImageReadError's "PATH: what. Fix: how" text into a Problem."""
    text = str(exc)
    if text.startswith(f"{path}: "):
        text = text[len(f"{path}: "):]
    message, sep, fix = text.partition(" Fix: ")
    return Problem(str(path), message.rstrip(".;, "), fix if sep else REEXPORT_FIX)


def _location_problems(root: Path, path: Path, roots: list[Path]) -> list[Problem]:
    """A file whose real path (symlinks followed) is neither in the dataset folder nor under an allowed root."""
    real = Path(os.path.realpath(path))
    if real.is_relative_to(Path(os.path.realpath(root))) or any(real.is_relative_to(r) for r in roots):
        return []
    where = f" or the allowed data roots ({', '.join(map(str, roots))})" if roots else ""
    return [Problem(str(path), f"resolves to {real}, outside the dataset folder{where}",
                    "copy the file into the dataset folder instead of linking it, or keep its target under a "
                    "configured data root (SEGFORGE_RAW)")]


def _grid_problems(path: Path, shape: tuple, geometry: Geometry, ref: tuple[Path, tuple, Geometry],
                   what: str, fix: str) -> list[Problem]:
    """Size and geometry differences between ``path`` and the case's reference channel."""
    ref_path, ref_shape, ref_geo = ref
    if geometry.ndim != ref_geo.ndim:  # one problem, not a size and a geometry one
        return [Problem(str(path), f"{what} is {geometry.ndim}D but {ref_path.name} is {ref_geo.ndim}D", fix)]
    problems = []
    if shape != ref_shape:
        problems.append(Problem(str(path), f"{what} size {shape} (z, y, x) differs from {ref_path.name} {ref_shape}",
                                fix))
    diffs = geometry.same_grid(ref_geo, tol=GEOMETRY_TOL)
    if diffs:
        detail = "; ".join(f"{name} {_fmt_tuple(getattr(geometry, name))} vs {_fmt_tuple(getattr(ref_geo, name))}"
                           for name in diffs)
        problems.append(Problem(str(path), f"{what} geometry differs from {ref_path.name}: {detail}", fix))
    return problems


def _nonfinite_problems(path: Path, array: np.ndarray) -> list[Problem]:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        try:  # SimpleITK's NIfTI reader turns NaN/inf into 0 without a word: count them in the file itself
            import nibabel as nib

            img = nib.load(str(path))
            if img.get_data_dtype().kind in "fc":
                array = np.asanyarray(img.dataobj)
        except Exception:
            pass
    if array.dtype.kind not in "fc":
        return []
    n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if not (n_nan or n_inf):
        return []
    return [Problem(str(path), f"holds {n_nan} NaN and {n_inf} infinite voxel(s)",
                    "replace them with finite values (e.g. the image's minimum) when exporting the file")]


def _label_problems(path: Path, label: np.ndarray, spec: DatasetSpec) -> list[Problem]:
    """Label values that are not finite, not integer, negative or not declared in dataset.json."""
    problems = _nonfinite_problems(path, label)
    if label.dtype.kind in "fc":
        values = np.unique(label[np.isfinite(label)]).real
        fractional = values[values != np.round(values)]
        if fractional.size:
            problems.append(Problem(str(path), f"holds fractional label values {_fmt_values(fractional)}",
                                    "labels are integers: store the file with an integer type; if it was resampled, "
                                    "use nearest-neighbour interpolation"))
        values = values[values == np.round(values)]
    else:
        values = np.unique(label)
    negative = values[values < 0]
    if negative.size:
        problems.append(Problem(str(path), f"holds negative label values {_fmt_values(negative)}",
                                'labels are non-negative: remap them, e.g. unlabeled voxels to an "ignore" label '
                                "above all others"))
    declared = set(spec.label_values)
    undeclared = [v for v in values if v >= 0 and int(v) not in declared]
    if undeclared:
        problems.append(Problem(str(path), f"holds label values {_fmt_values(undeclared)} not declared in dataset.json "
                                           f"labels (declared: {spec.label_values})",
                                "declare them in dataset.json \"labels\" or relabel the file"))
    return problems


def _dimension_problems(ndims: list[tuple[str, int]]) -> list[Problem]:
    """Image files whose dimensionality differs from the dataset's (the majority; ties go to the first case)."""
    counts = Counter(n for _, n in ndims)
    if len(counts) < 2:
        return []
    major = max(counts, key=lambda n: (counts[n], n == ndims[0][1]))
    return [Problem(path, f"is a {n}D image but {counts[major]} image file(s) of the dataset are {major}D",
                    f"make every case {major}D (a dataset is either 2D or 3D), or remove this case")
            for path, n in ndims if n != major]


def _fmt_values(values) -> str:
    shown = [f"{float(v):g}" if isinstance(v, (float, np.floating)) and v != int(v) else str(int(v))
             for v in list(values)[:MAX_LISTED]]
    more = f", ... ({len(values)} in all)" if len(values) > MAX_LISTED else ""
    return "[" + ", ".join(shown) + more + "]"


def _fmt_tuple(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"
