"""The dataset format: nnU-Net's raw layout, read unchanged.

```
Dataset001_Name/
  dataset.json          channel_names, labels, numTraining, file_ending [, regions_class_order, dataset]
  imagesTr/CASE_0000.nii.gz   one file per channel (XXXX = channel index)
  labelsTr/CASE.nii.gz
  imagesTs/CASE_0000.nii.gz   optional
```
Labels are ``{"name": int}``, or region-based ``{"name": [int, ...]}`` with ``regions_class_order``; a label
named ``ignore`` (the highest value) is excluded from loss and metrics. An optional ``dataset`` entry lists
files explicitly (``{"CASE": {"images": [...], "label": "..."}}``); such paths must stay inside the dataset
folder (a symlink inside the folder may point anywhere: the link itself is what the user put there).

This module parses and discovers; ``segforge.io.checks`` reports every problem at once.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from segforge.errors import SegforgeError
from segforge.io.header_checks import detached_data_files
from segforge.io.image import SUPPORTED_ENDINGS


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: which file, what, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}\n    fix: {self.fix}"


class DatasetError(SegforgeError):
    """The dataset has problems; ``problems`` lists all of them."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"the dataset has {len(problems)} problem(s):"] + [str(p) for p in problems]
        super().__init__("\n".join(lines))


@dataclass
class Case:
    case_id: str
    image_files: list[Path]
    label_file: Path | None


@dataclass
class DatasetSpec:
    """dataset.json, validated, plus the cases found on disk."""

    root: Path
    channel_names: dict[int, str]
    labels: dict[str, int | list[int]]
    file_ending: str
    num_training: int
    regions_class_order: list[int] | None = None
    cases: list[Case] = field(default_factory=list)
    test_cases: list[Case] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, list) for v in self.labels.values())

    @property
    def ignore_label(self) -> int | None:
        value = self.labels.get("ignore")
        return value if isinstance(value, int) else None

    @property
    def label_values(self) -> list[int]:
        """Every integer value allowed in a label file (background, classes, regions' members, ignore)."""
        values = set()
        for v in self.labels.values():
            values.update(v if isinstance(v, list) else [v])
        return sorted(values)

    @property
    def mask_values(self) -> list[int]:
        """The label values without the ignore label, background first: the one-hot channels of a label map given
        to a mask-conditioned denoiser."""
        return [v for v in self.label_values if v != self.ignore_label]

    @property
    def foreground_classes(self) -> dict[str, int]:
        """Class name -> value for the classes a model predicts (no background, no ignore, no regions)."""
        return {k: v for k, v in self.labels.items() if isinstance(v, int) and v != 0 and k != "ignore"}

    @property
    def num_outputs(self) -> int:
        return count_outputs(self.labels)


def count_outputs(labels: dict) -> int:
    """Output channels of a segmentation network: classes incl. background, or one per region."""
    if any(isinstance(v, list) for v in labels.values()):
        return len([k for k, v in labels.items() if k not in ("background", "ignore") and v != 0])
    return 1 + len([k for k, v in labels.items() if isinstance(v, int) and v != 0 and k != "ignore"])


DATASET_JSON_FIX = (
    "write dataset.json as in datasets/README.md: "
    '{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": N, "file_ending": ".nii.gz"}'
)


def parse_dataset_json(root: Path, require_labels: bool = True) -> tuple[dict | None, list[Problem]]:
    """Load and type-check dataset.json. Returns the validated fields (or None) and every problem found.

    Without ``require_labels`` (an unlabelled dataset, for ``task=denoise``) a missing ``labels`` entry means
    ``{"background": 0}``."""
    path = root / "dataset.json"
    raw, problem = _read_dataset_json(path)
    if problem is not None:
        return None, [problem]
    problems = []

    def bad(msg: str, fix: str = DATASET_JSON_FIX) -> None:
        problems.append(Problem(str(path), msg, fix))

    channel_names = _channel_names(raw.get("channel_names", raw.get("modality")), bad)
    labels = _labels(raw.get("labels", None if require_labels else {"background": 0}), bad)
    ending = _file_ending(raw.get("file_ending"), bad)
    num_training = raw.get("numTraining")
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        bad(f'"numTraining" is {num_training!r}; it must be a non-negative integer')
    regions_class_order = _regions_class_order(raw.get("regions_class_order"), labels, bad)
    if problems:
        return None, problems
    return {
        "channel_names": channel_names,
        "labels": labels,
        "file_ending": ending,
        "num_training": num_training,
        "regions_class_order": regions_class_order,
        "raw": raw,
    }, []


def _read_dataset_json(path: Path) -> tuple[dict | None, Problem | None]:
    """dataset.json's object, or the one problem that stops reading it."""
    if not path.is_file():
        return None, Problem(str(path), "dataset.json is missing", DATASET_JSON_FIX)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, Problem(str(path), f"is not valid JSON ({exc})", DATASET_JSON_FIX)
    except RecursionError:  # e.g. 100,000 nested brackets: Python's parser gives up
        return None, Problem(str(path), "is nested too deeply to read (no dataset.json needs more than a few levels)",
                             DATASET_JSON_FIX)
    if not isinstance(raw, dict):
        return None, Problem(str(path), "must hold a JSON object", DATASET_JSON_FIX)
    return raw, None


def _channel_names(cn, bad) -> dict[int, str]:
    """``channel_names`` (or the old ``modality``) as index -> name; each problem goes to ``bad``."""
    channel_names: dict[int, str] = {}
    if not isinstance(cn, dict) or not cn:
        bad('"channel_names" is missing or not an object like {"0": "CT"}')
        return channel_names
    for key, value in cn.items():
        if not str(key).isdigit() or not isinstance(value, str):
            bad(f'"channel_names" entry {key!r}: {value!r} must map a channel index string to a name')
        elif int(key) in channel_names:  # "0" and "00": JSON keeps both, the second would win silently
            twin = next(k for k in cn if str(k).isdigit() and int(k) == int(key) and k != key)
            bad(f'"channel_names" has the keys {twin!r} and {key!r} for the same channel {int(key)}',
                f'keep one key per channel, written without leading zeros ("{int(key)}")')
        else:
            channel_names[int(key)] = value
    if channel_names and sorted(channel_names) != list(range(len(channel_names))):
        bad(f'"channel_names" indices must be 0..{len(channel_names) - 1}, got {sorted(channel_names)}')
    return channel_names


def _labels(lb, bad) -> dict[str, int | list[int]]:
    """``labels``: the well-typed entries, then the rules over all of them (background 0, no value twice, ignore
    on top, consecutive classes); each problem goes to ``bad``."""
    labels: dict[str, int | list[int]] = {}
    if not isinstance(lb, dict) or not lb:
        bad('"labels" is missing or not an object like {"background": 0, "organ": 1}')
        return labels
    for name, value in lb.items():
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        ):
            bad(f'label {name!r} has value {value!r}; a label is an integer, or a list of integers for a region')
        elif (isinstance(value, int) and value < 0) or (isinstance(value, list) and min(value) < 0):
            bad(f"label {name!r} has a negative value {value!r}")
        else:
            labels[str(name)] = value
    if labels and labels.get("background") != 0:
        bad('"labels" needs "background": 0')
    ints = [v for k, v in labels.items() if isinstance(v, int)]
    if len(ints) != len(set(ints)):
        bad(f'"labels" uses a value twice: {sorted(ints)}')
    if "ignore" in labels:
        ignore = labels["ignore"]
        others = [v for k, v in labels.items() if k != "ignore" for v in (v if isinstance(v, list) else [v])]
        if not isinstance(ignore, int) or (others and ignore <= max(others)):
            bad(f'the "ignore" label must be a single integer above all others, got {ignore!r}')
    classes = sorted(v for k, v in labels.items() if isinstance(v, int) and k != "ignore")
    if not any(isinstance(v, list) for v in labels.values()) and len(classes) == len(set(classes)) \
            and classes != list(range(len(classes))):
        # the network has one output per class: value v is output v, so a gap has no output (nnU-Net's rule)
        named = ", ".join(f'"{k}": {v}' for k, v in sorted(labels.items(), key=lambda kv: kv[1])
                          if k != "ignore")
        bad(f'"labels" values must be consecutive 0, 1, ..., {len(classes) - 1}; got {{{named}}} (a gap at '
            f'{next(i for i, v in enumerate(classes) if v != i)})',
            "renumber the labels consecutively in dataset.json and in every label file (e.g. 5 -> 2); "
            'only "ignore" may sit above the others')
    return labels


def _file_ending(ending, bad):
    """``file_ending``, which must be one of ``SUPPORTED_ENDINGS`` exactly; a problem goes to ``bad``."""
    if isinstance(ending, str) and ending != ending.lower() and ending.lower() in SUPPORTED_ENDINGS:
        # one rule everywhere: file_ending is lower case and file names end in it exactly (as in nnU-Net); an
        # upper-case ending has no SimpleITK writer and would fail at the first mask written
        bad(f'"file_ending" is {ending!r}; file endings are lower case',
            f'write "file_ending": "{ending.lower()}" and name the files CASE_0000{ending.lower()}')
    elif not isinstance(ending, str) or ending not in SUPPORTED_ENDINGS:
        bad(f'"file_ending" is {ending!r}; use one of {", ".join(SUPPORTED_ENDINGS)}')
    return ending


def _regions_class_order(regions_class_order, labels: dict, bad):
    """``regions_class_order``, which region-based labels need (one integer per region); a problem goes to ``bad``."""
    if any(isinstance(v, list) for v in labels.values()):
        n_regions = len([k for k, v in labels.items() if k not in ("background", "ignore")])
        if not (isinstance(regions_class_order, list) and all(isinstance(v, int) for v in regions_class_order)):
            bad('region-based labels (lists) need "regions_class_order": one integer per region, in painting order')
        elif len(regions_class_order) != n_regions:
            bad(f'"regions_class_order" has {len(regions_class_order)} entries for {n_regions} regions')
    return regions_class_order


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def inside(root: Path, path: Path) -> bool:
    """True when ``path`` (not following a final symlink's target) lies under ``root``."""
    root_abs = Path(os.path.abspath(root))
    return Path(os.path.abspath(path)).is_relative_to(root_abs)


def group_channel_files(folder: Path, ending: str) -> tuple[dict[str, dict[int, Path]], list[Problem]]:
    """Files of ``folder`` grouped by case: ``{case: {channel: path}}`` from ``CASE_XXXX<ending>`` names."""
    channels: dict[str, dict[int, Path]] = {}
    problems = []
    detached = detached_data_files(Path(folder)) if ending in (".mhd", ".nhdr") else set()
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or Path(os.path.abspath(path)) in detached:
            continue  # hidden, or the data file of a header (checked with it)
        named = _name_problems(path, ending, Path(folder).name)
        if named:
            problems += named
            continue
        match = _CHANNEL_RE.match(path.name[: -len(ending)])
        if not match:
            problems.append(Problem(str(path), "name lacks the _XXXX channel suffix",
                                    f"rename it CASE_0000{ending} (channel 0), CASE_0001{ending} (channel 1), ..."))
            continue
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    return channels, problems


def _name_problems(path: Path, ending: str, folder: str) -> list[Problem]:
    """A file name that cannot be a case's: a control character in it, or another ending (compared exactly: file
    names end in the lower-case file_ending, as in nnU-Net)."""
    if any(unicodedata.category(c) == "Cc" for c in path.name):  # not undecodable bytes (surrogates): those work
        shown = path.name.encode("unicode_escape", "backslashreplace").decode("ascii")
        return [Problem(repr(str(path)), f"file name '{shown}' holds a control character (newline, tab, ...)",
                        "rename the file without it (CASE_0000" + ending + ")")]
    if not path.name.endswith(ending):
        if path.name.lower().endswith(ending):
            return [Problem(str(path), f"ends in {path.name[-len(ending):]!r}, not in the dataset's file_ending "
                                       f"{ending!r} (endings are compared exactly)",
                            f"rename it to end in {ending}")]
        return [Problem(str(path), f"does not end in the dataset's file_ending {ending!r}",
                        f"convert it to {ending} or remove it from {folder}/")]
    return []


def discover_cases(root: Path, fields: dict, images_dir: str, labels_dir: str | None) -> tuple[list[Case], list[Problem]]:
    """Group ``images_dir`` files into cases by their ``_XXXX`` channel suffix and pair them with labels."""
    ending = fields["file_ending"]
    n_channels = len(fields["channel_names"])
    problems: list[Problem] = []
    image_dir = root / images_dir
    if not image_dir.is_dir():
        return [], ([Problem(str(image_dir), "folder is missing", f"put the training images in {images_dir}/CASE_0000{ending}")]
                    if labels_dir else [])
    channels, found = group_channel_files(image_dir, ending)
    problems += found
    cases = []
    for case_id, files in sorted(channels.items()):
        missing = [c for c in range(n_channels) if c not in files]
        extra = [c for c in files if c >= n_channels]
        for c in missing:
            problems.append(Problem(str(image_dir / f"{case_id}_{c:04d}{ending}"), f"channel {c} of case {case_id} is missing",
                                    f"add the file; dataset.json declares {n_channels} channel(s)"))
        for c in extra:
            problems.append(Problem(str(files[c]), f"channel {c} is not declared in dataset.json channel_names",
                                    "declare the channel in channel_names or remove the file"))
        label = None
        if labels_dir:
            candidate = root / labels_dir / f"{case_id}{ending}"
            if candidate.is_file():
                label = candidate
            else:
                problems.append(Problem(str(candidate), f"label of case {case_id} is missing",
                                        f"add {labels_dir}/{case_id}{ending} or remove the case's images"))
        if not missing:
            cases.append(Case(case_id, [files[c] for c in range(n_channels)], label))
    if labels_dir and (root / labels_dir).is_dir():
        detached = detached_data_files(root / labels_dir) if ending in (".mhd", ".nhdr") else set()
        for path in sorted((root / labels_dir).iterdir()):
            if path.name.startswith(".") or Path(os.path.abspath(path)) in detached:
                continue
            named = _name_problems(path, ending, labels_dir)
            if named:
                problems += named
                continue
            case_id = path.name[: -len(ending)]
            if case_id not in channels:
                problems.append(Problem(str(path), f"label without an image: no {images_dir}/{case_id}_0000{ending}",
                                        "add the case's images or remove the label"))
    elif labels_dir:
        problems.append(Problem(str(root / labels_dir), "folder is missing", f"put one label file per case in {labels_dir}/"))
    return cases, problems


def cases_from_listing(root: Path, listing: dict, n_channels: int) -> tuple[list[Case], list[Problem]]:
    """Cases from dataset.json's explicit ``dataset`` entry; every path must stay inside ``root``."""
    problems, cases = [], []
    json_path = str(root / "dataset.json")
    for case_id, entry in sorted(listing.items()):
        # a case id names files in the work folders (CASE.npy, validation/CASE.nii.gz): never a path of its own
        if (any(sep in case_id for sep in ("/", "\\")) or case_id.startswith(".") or not case_id
                or any(ord(ch) < 32 for ch in case_id)):
            problems.append(Problem(json_path, f'"dataset" entry {case_id!r} is not a plain case name (a path separator, '
                                    "a leading dot or a control character would name files outside segforge's folders)",
                                    "name the case with letters, digits, '_' and '-', e.g. case_001"))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
            problems.append(Problem(json_path, f'"dataset" entry {case_id!r} needs "images": [...] and "label"',
                                    'write {"CASE": {"images": ["imagesTr/CASE_0000.nii.gz"], "label": "labelsTr/CASE.nii.gz"}}'))
            continue
        files = []
        for rel in entry["images"] + ([entry["label"]] if entry.get("label") else []):
            path = root / str(rel)
            if os.path.isabs(str(rel)) or not inside(root, path):
                problems.append(Problem(json_path, f"case {case_id!r} refers to {rel!r}, outside the dataset folder",
                                        "use paths relative to the dataset folder (a symlink inside it may point elsewhere)"))
            elif not path.is_file():
                problems.append(Problem(str(path), f"listed for case {case_id!r} in dataset.json but missing", "add the file or fix the path"))
            files.append(path)
        if len(entry["images"]) != n_channels:
            problems.append(Problem(json_path, f"case {case_id!r} lists {len(entry['images'])} images for {n_channels} channel(s)",
                                    "list one image per channel"))
        cases.append(Case(str(case_id), files[: len(entry["images"])], files[-1] if entry.get("label") else None))
    return cases, problems


def scan_dataset(root: Path, require_labels: bool = True) -> tuple[DatasetSpec | None, list[Problem]]:
    """dataset.json plus the cases on disk; problems of layout only (file contents: ``segforge.io.checks``)."""
    root = Path(root)
    if not root.is_dir():
        return None, [Problem(str(root), "dataset folder not found", "give the path to a folder holding dataset.json, imagesTr/ and labelsTr/")]
    fields, problems = parse_dataset_json(root, require_labels)
    if fields is None:
        return None, problems
    if isinstance(fields["raw"].get("dataset"), dict):
        cases, found = cases_from_listing(root, fields["raw"]["dataset"], len(fields["channel_names"]))
    else:
        cases, found = discover_cases(root, fields, "imagesTr", "labelsTr" if require_labels else None)
    problems += found
    test_cases, _ = discover_cases(root, fields, "imagesTs", None)
    if fields["num_training"] != len(cases) and not found:
        problems.append(Problem(str(root / "dataset.json"), f'"numTraining" is {fields["num_training"]} but {len(cases)} training case(s) were found',
                                f'set "numTraining": {len(cases)}'))
    spec = DatasetSpec(root=root.resolve(), channel_names=fields["channel_names"], labels=fields["labels"],
                       file_ending=fields["file_ending"], num_training=fields["num_training"],
                       regions_class_order=fields["regions_class_order"], cases=cases, test_cases=test_cases, raw=fields["raw"])
    return spec, problems


def load_dataset(root: Path, require_labels: bool = True) -> DatasetSpec:
    """The dataset's spec, or ``DatasetError`` listing every layout problem."""
    spec, problems = scan_dataset(root, require_labels)
    if problems:
        raise DatasetError(problems)
    return spec
