"""The container, checked without a Docker engine: the Dockerfile's instructions, its paths and variables against
what segforge reads, a non-editable install that finds its configs, and a non-root run on a read-only dataset."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tree_hash, write_dataset

REPO = Path(__file__).resolve().parent.parent


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_parses_and_matches_what_segforge_reads():
    steps = instructions(REPO / "docker" / "Dockerfile")
    known = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "VOLUME", "HEALTHCHECK", "ENTRYPOINT", "CMD", "ARG", "LABEL"}
    assert [k for k, _ in steps if k not in known] == [] and steps[0][0] == "FROM"
    base = steps[0][1]
    assert "cuda" in base and "runtime" in base
    torch_version = tuple(int(v) for v in re.search(r":(\d+)\.(\d+)", base).groups())
    assert (2, 3) <= torch_version < (2, 14)  # the base image's torch satisfies pyproject's range: pip keeps it
    env = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    # every root the paths config takes from the environment is set, and is a declared volume
    paths = (REPO / "segforge" / "configs" / "paths" / "default.yaml").read_text()
    read = set(re.findall(r"oc\.env:(SEGFORGE_\w+)", paths))
    assert read == {"SEGFORGE_RAW", "SEGFORGE_WORK", "SEGFORGE_PREPROCESSED", "SEGFORGE_RESULTS"} and read <= set(env)
    volumes = set(json.loads(next(a for k, a in steps if k == "VOLUME")))
    assert {env[v] for v in read} <= volumes
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert json.loads(next(a for k, a in steps if k == "ENTRYPOINT")) == ["segforge"]
    assert "segforge" in next(a for k, a in steps if k == "HEALTHCHECK") and "--version" in next(a for k, a in steps if k == "HEALTHCHECK")
    install = next(a for k, a in steps if k == "RUN" and "pip install" in a)
    assert re.search(r"pip install \.(\s|$)", install) and " -e " not in install  # non-editable
    ignored = (REPO / ".dockerignore").read_text().split()
    for keyword, args in steps:
        if keyword == "COPY":
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists() and source not in ignored, source
    assert ".git" in ignored and ".venv" in ignored


@pytest.mark.slow
def test_a_non_editable_install_finds_its_configs(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           *map(str, wheel_dir.glob("*.whl"))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check = ("import segforge, sys; from segforge.cli.main import CONFIG_DIR, compose_config; "
             f"assert segforge.__file__.startswith({str(target)!r}), segforge.__file__; "
             "cfg = compose_config('train', ['trainer.max_epochs=3']); assert cfg.trainer.max_epochs == 3; "
             "assert (CONFIG_DIR / 'data' / 'default.yaml').is_file(); print(CONFIG_DIR)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(target))
    version = subprocess.run([sys.executable, "-m", "segforge", "--version"], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
    assert version.returncode == 0 and "segforge" in version.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to switch users")
def test_a_non_root_user_plans_a_dataset_it_cannot_write(tmp_path):
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="segforge-nonroot-", dir="/tmp"))  # pytest's own tmp is root-only (0700)
    os.chmod(tmp_path, 0o755)
    dataset = write_dataset(tmp_path / "Dataset001_Tiny")
    for path in [dataset, *dataset.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)  # readable by everyone, writable by no one but root
    before = tree_hash(dataset)
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    env = {**os.environ, "HOME": str(work), "SEGFORGE_WORK": str(work), "MPLCONFIGDIR": str(work / ".mpl")}
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "segforge", "plan",
               str(dataset), "plan.features_base=4", "plan.configurations=[3d_fullres]", "preprocess.num_workers=1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / dataset.name / "plans_default.json").is_file()
    assert tree_hash(dataset) == before  # not a byte changed
    # writing into the dataset is refused before anything is done, with the reason
    denied = subprocess.run(command[:-3] + [f"paths.work_root={dataset / 'work'}"], capture_output=True, text=True,
                            env=env, cwd=work, timeout=300)
    assert denied.returncode != 0 and tree_hash(dataset) == before
    for path in [dataset, *dataset.rglob("*")]:
        os.chmod(path, 0o755)
    shutil.rmtree(tmp_path, ignore_errors=True)
