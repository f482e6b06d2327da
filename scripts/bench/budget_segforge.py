"""The segforge arms of the budget benchmark (``scripts/bench_budget.py``), run through segforge's command line as
a user would, each command a subprocess (``python -m segforge ...``), strictly one after another.

Imported as ``bench.budget_segforge`` (``scripts/`` on ``sys.path``); imports nothing of segforge itself (the
interface is the CLI). Arms:

* ``segforge_budget``: segforge's budget-aware recipe: ``segforge train DATASET --work W budget=15m fold=0``;
* ``segforge_full_nnunet_recipe`` (ablation): the full-size 3d_fullres plan with nnU-Net's recipe, same budget:
  ``segforge train DATASET --work W budget=15m fold=0 recipe=nnunet configuration=3d_fullres
  final_validation.mirror=false`` (every arm validates and predicts without test-time mirroring).

Steps of one arm run, work root ``<arm_dir>/work``:

1. plan + preprocess, not timed: ``segforge plan DATASET --work W budget=15m`` (reused when done for the same
   dataset and budget; marker ``<arm_dir>/prepared.json``);
2. train, timed (wall-clock of the whole command, start-up included): the command above, after removing
   ``W/<dataset>/results`` (a fresh run: segforge would otherwise resume a fold's last checkpoint). It prints
   ``model folder: PATH`` and ``run folder: PATH``; iterations and epochs come from the run folder's
   ``training_summary.json`` (``global_step``, ``epochs``) when it is there;
3. predict the held-out images, not timed: ``segforge predict -i DATASET/imagesTs -o OUT --model MODEL --work W
   predict.mirror=false predict.folds=[0]``;
4. score: ``bench.budget_eval`` (the same Dice code for every arm).

Every command runs with ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = threads (2); segforge's own thread policy
(``data.torch_threads=auto``) is left to the recipe. ``SEGFORGE_PREPROCESSED``/``SEGFORGE_RESULTS`` are removed
from the commands' environment so that ``--work`` decides every path. Output of each command goes to
``<arm_dir>/<step>.log``; a failing command raises ``CommandError`` with the end of its log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ARMS = {
    "segforge_budget": [],
    # the final validation without test-time mirroring, as in every arm (nnU-Net's too): with mirroring, the full
    # plan's validation alone (531 s measured) is refused by a 5-minute budget
    "segforge_full_nnunet_recipe": ["recipe=nnunet", "configuration=3d_fullres", "final_validation.mirror=false"],
}


class CommandError(RuntimeError):
    """A segforge command failed or timed out; the message holds the end of its log."""


def budget_token(minutes: float) -> str:
    """``budget=`` value: ``15m`` for whole minutes, else seconds (``90s``)."""
    return f"{int(minutes)}m" if float(minutes).is_integer() else f"{int(round(minutes * 60))}s"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_command(cmd: list[str], log_path: Path, env: dict, timeout: float | None = None,
                cwd: Path | None = None) -> dict:
    """Run ``cmd`` (own session: a timeout kills it with its workers), output to ``log_path``; wall seconds, CPU
    seconds of it and its reaped descendants, and its output."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if timed_out.is_set():
        raise CommandError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\nlog {log_path}:\n{_tail(log_path)}")
    if proc.returncode != 0:
        raise CommandError(f"exit code {proc.returncode}: {' '.join(cmd)}\nlog {log_path}:\n{_tail(log_path)}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "output": log_path.read_text(errors="replace")}


def parse_folders(output: str) -> tuple[Path | None, Path | None]:
    """``model folder: PATH`` and ``run folder: PATH`` from ``segforge train``'s output (the last of each)."""
    model = re.findall(r"^model folder:\s*(.+?)\s*$", output, flags=re.M)
    run = re.findall(r"^run folder:\s*(.+?)\s*$", output, flags=re.M)
    return (Path(model[-1]) if model else None), (Path(run[-1]) if run else None)


def run_summary(run_folder: Path | None) -> dict:
    """What the run folder says about the training (iterations, epochs, budget split), best effort."""
    if run_folder is None:
        return {}
    path = run_folder / "training_summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {"iterations": summary.get("global_step"), "epochs": summary.get("epochs")}
    for key in ("budget", "final_metrics", "configuration", "recipe"):
        if key in summary:
            out[key] = summary[key]
    return out


class SegforgeBudgetArm:
    """One segforge arm run under ``arm_dir``."""

    def __init__(self, arm: str, dataset_root: Path, arm_dir: Path, budget_minutes: float, threads: int = 2, log=print):
        if arm not in ARMS:
            raise ValueError(f"unknown segforge arm {arm!r}; known: {', '.join(ARMS)}")
        self.name = arm
        self.dataset_root = Path(dataset_root).resolve()
        self.arm_dir = Path(arm_dir).resolve()
        self.work = self.arm_dir / "work"
        self.budget_minutes = float(budget_minutes)
        self.threads = int(threads)
        self.log = log
        self.timeout = 3 * 60 * self.budget_minutes + 900

    def params(self) -> dict:
        return {"overrides": [f"budget={budget_token(self.budget_minutes)}", "fold=0", *ARMS[self.name]],
                "predict_overrides": ["predict.mirror=false", "predict.folds=[0]"]}

    def env(self) -> dict:
        env = dict(os.environ)
        for key in ("SEGFORGE_PREPROCESSED", "SEGFORGE_RESULTS", "SEGFORGE_WORK"):
            env.pop(key, None)
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        return env

    def segforge(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "segforge", *args]

    def prepare(self) -> dict:
        token = budget_token(self.budget_minutes)
        want = {"dataset": self.dataset_root.name, "budget": token,
                "dataset_json": json.loads((self.dataset_root / "dataset.json").read_text()).get("bench_mni")}
        marker = self.arm_dir / "prepared.json"
        if marker.is_file() and json.loads(marker.read_text()) == want:
            return {"reused": True}
        marker.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        done = run_command(self.segforge("plan", str(self.dataset_root), "--work", str(self.work), f"budget={token}"),
                           self.arm_dir / "plan.log", self.env(), self.timeout, cwd=self.arm_dir)
        marker.write_text(json.dumps(want))
        self.log(f"  segforge plan budget={token}: {done['seconds']:.0f} s (not timed); log {self.arm_dir / 'plan.log'}")
        return {"reused": False, "seconds": done["seconds"]}

    def run(self) -> dict:
        self.arm_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        shutil.rmtree(self.work / self.dataset_root.name / "results", ignore_errors=True)  # fresh, not resumed
        overrides = self.params()["overrides"]
        self.log(f"  segforge train {' '.join(overrides)} ...")
        train = run_command(self.segforge("train", str(self.dataset_root), "--work", str(self.work), *overrides),
                            self.arm_dir / "train.log", self.env(), self.timeout, cwd=self.arm_dir)
        model, run = parse_folders(train["output"])
        if model is None:
            raise CommandError(f"segforge train printed no 'model folder:' line; log {self.arm_dir / 'train.log'}")
        summary = run_summary(run)
        self.log(f"  trained: {train['seconds']:.0f} s wall, {summary.get('iterations', '?')} iterations, "
                 f"{summary.get('epochs', '?')} epochs; model {model}")
        pred_dir = self.arm_dir / "pred"
        shutil.rmtree(pred_dir, ignore_errors=True)
        pred_dir.mkdir(parents=True)
        predict = run_command(self.segforge("predict", "-i", str(self.dataset_root / "imagesTs"), "-o", str(pred_dir),
                                            "--model", str(model), "--work", str(self.work), *self.params()["predict_overrides"]),
                              self.arm_dir / "predict.log", self.env(), self.timeout, cwd=self.arm_dir)
        self.log(f"  predicted held-out cases in {predict['seconds']:.0f} s")
        return {"train_seconds": train["seconds"], "train_wall_seconds": train["seconds"],
                "iterations": summary.get("iterations"), "epochs": summary.get("epochs"),
                "predict_seconds": predict["seconds"], "pred_dir": str(pred_dir), "cpu_seconds": train["cpu_seconds"],
                "details": {"model_dir": str(model), "run_dir": str(run) if run else None, "summary": summary}}
