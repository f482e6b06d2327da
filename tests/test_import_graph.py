"""The import graph of segforge/ and scripts/, read from the code with ``ast``: the layers import one way and no
module is part of a circle.

Layers: ``cli -> {planning, preprocessing, training, inference, evaluation, demo} -> {nn, diffusion, io}`` (and the
package's root modules, ``segforge.errors`` etc., below all). Training may import inference (its final validation is a
prediction); inference never imports training, so a predictor loads without Lightning. Every import counts, also one
inside a function: a lazy import hides an edge, it does not remove it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP, MIDDLE, BOTTOM = {"cli"}, {"planning", "preprocessing", "training", "inference", "evaluation", "demo"}, \
    {"nn", "diffusion", "io"}
RANK = {**{p: 2 for p in TOP}, **{p: 1 for p in MIDDLE}, **{p: 0 for p in BOTTOM}, "root": -1}


def module_files(repo: Path) -> dict[str, Path]:
    """Module name -> file: ``segforge.*`` from the package, ``bench.*`` and the scripts by their import names
    (scripts put ``scripts/`` on ``sys.path`` and import ``bench.x``)."""
    modules = {}
    for path in (repo / "segforge").rglob("*.py"):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (repo / "scripts").rglob("*.py"):
        parts = list(path.relative_to(repo / "scripts").with_suffix("").parts)
        modules["scripts:" + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_edges(repo: Path) -> dict[str, set[str]]:
    """Every module's imports of other modules of the tree (``from a import b`` counts ``a.b`` when it is a module)."""
    modules = module_files(repo)
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        script = name.startswith("scripts:")
        bare = name.removeprefix("scripts:")
        package = bare if path.name == "__init__.py" else bare.rpartition(".")[0]
        named = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # a submodule where the name is one, else the module it comes from
                    member = f"{source}.{alias.name}"
                    named.add(member if (f"scripts:{member}" if script else member) in modules else source)
        targets = set()
        for target in named:
            while target:
                key = target if target.startswith("segforge") or not script else f"scripts:{target}"
                if key in modules:
                    if key != name:
                        targets.add(key)
                    break
                target = target.rpartition(".")[0]
        edges[name] = targets
    return edges


def layer(module: str) -> str | None:
    """The layer of a segforge module (``root`` for ``segforge.errors`` and the like); None outside segforge."""
    parts = module.split(".")
    if parts[0] != "segforge":
        return None
    if len(parts) > 1 and parts[1] == "__main__":  # `python -m segforge`: the command line's entry point
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "root"


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Edges against the layer order, or from inference to training."""
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = layer(source), layer(target)
            if a is None or b is None or a == b:
                continue
            if RANK[b] > RANK[a] or (a == "inference" and b == "training"):
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_layers_import_one_way():
    bad = layer_violations(import_edges(REPO))
    assert not bad, "imports against the layer order (cli -> stages -> nn/diffusion/io; inference never imports " \
                    "training):\n" + "\n".join(bad)


def test_no_import_circle_in_segforge_or_scripts():
    found = circles(import_edges(REPO))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in {p.parent for p in tmp_path.rglob("*.py")}:
        (package / "__init__.py").touch()
    return tmp_path


def test_the_checks_report_the_old_trees_circles_and_edges(tmp_path):
    """The three circles of the tree before the restructuring (issue 18), rebuilt in miniature, are each reported by
    name; so is the inference -> training edge behind the first."""
    repo = _tree(tmp_path, {
        "segforge/training/run.py": "from segforge.training.tasks import make_task\n",
        "segforge/training/tasks.py": "def f():\n    from segforge.inference.generative import DenoisingModel\n",
        "segforge/inference/generative.py": "from segforge.inference.predictor import load_network\n",
        "segforge/inference/predictor.py": "from segforge.training.run import FINAL_WEIGHTS\n",
        "segforge/cli/commands.py": "from segforge.demo.runner import run_demo\n",
        "segforge/demo/runner.py": "def g():\n    from segforge.cli.main import main\n",
        "segforge/cli/main.py": "from segforge.cli import commands\n",
        "scripts/bench/budget_nnunet.py": "def h():\n    from bench.budget_nnunet_trainer import T\n",
        "scripts/bench/budget_nnunet_trainer.py": "from bench.budget_nnunet import plan_schedule\n",
        "scripts/bench_budget.py": "from bench.budget_nnunet import NnunetBudgetArm\n",
    })
    edges = import_edges(repo)
    assert sorted(circles(edges)) == [
        ["scripts:bench.budget_nnunet", "scripts:bench.budget_nnunet_trainer"],
        ["segforge.cli.commands", "segforge.cli.main", "segforge.demo.runner"],
        ["segforge.inference.generative", "segforge.inference.predictor", "segforge.training.run",
         "segforge.training.tasks"],
    ]
    assert layer_violations(edges) == ["segforge.demo.runner -> segforge.cli.main",
                                       "segforge.inference.predictor -> segforge.training.run"]


def test_relative_and_package_imports_are_resolved(tmp_path):
    repo = _tree(tmp_path, {
        "segforge/io/a.py": "from . import b\nfrom .b import thing\n",
        "segforge/io/b.py": "from ..nn import unet\n",
        "segforge/nn/unet.py": "import segforge.io.a\n",
    })
    edges = import_edges(repo)
    assert edges["segforge.io.a"] == {"segforge.io.b"}
    assert edges["segforge.io.b"] == {"segforge.nn.unet"}
    assert circles(edges) == [["segforge.io.a", "segforge.io.b", "segforge.nn.unet"]]


def test_the_predictor_loads_without_lightning_or_hydra():
    code = ("import sys, segforge.inference.predictor, segforge.inference.folder; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'hydra', 'segforge.training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", ["segforge.inference.predictor", "segforge.io.model_folder"])
def test_inference_modules_import_no_training_module(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('segforge.training')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plan_with_a_budget_never_loads_lightning(tmp_path):
    """`segforge plan` (check, fingerprint, plans, preprocessing) needs no training loop: Lightning's import took
    1.5 s of it when a duration parser lived beside the schedule callback."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_dataset

    dataset = write_dataset(tmp_path / "Dataset001_Tiny", num_train=4, num_test=0)
    code = ("import sys\nfrom segforge.cli.main import main\n"
            f"code = main(['plan', {str(dataset)!r}, 'paths.work_root={tmp_path / 'work'}', 'plan.configurations=[3d_fullres]',"
            " 'plan.memory.method=analytic', 'preprocess.num_workers=0', 'budget=60s', 'plan.compute.target_iterations=10'])\n"
            "print(code, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout[-2000:] + out.stderr[-2000:]
