"""The precision a plan is made for, traced at and trained at (``trainer.precision: plan``).

float16 and bfloat16 autocast keep the same 2-byte activations, so a plan's memory holds for both; float32 doubles
them. bfloat16 needs a GPU with bf16 units (Ampere and newer), float16 runs on every CUDA GPU. A CPU has no float16
autocast, and bfloat16 is fast there only on CPUs with bf16 units (the budget plan measures it: ``compute.py``).
Plans are often made on another machine than the GPU, so ``plan.gpu`` names the card when it is not this one's.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from segforge.planning.budget import MemoryBudget
from segforge.planning.memory import GIB, network_encoder, spec_from_plan, traced_peak_bytes

log = logging.getLogger(__name__)

PRECISIONS = ("16-mixed", "bf16-mixed", "32-true")
# trainer.precision values (Lightning's spellings) whose step the planner can trace, by the precision traced
TRACEABLE = {"16-mixed": "16-mixed", "16": "16-mixed", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
             "32-true": "32-true", "32": "32-true"}


def cuda_supports_bf16() -> bool:
    """Whether the current CUDA device has bf16 units (emulated bf16 is slower than float16)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation (and counts no emulation)
        return bool(torch.cuda.is_bf16_supported())


def planned_precision(rules) -> tuple[str, str]:
    """(precision, why) the plan's GPU configurations are traced and trained at (``plan.memory.precision``)."""
    wanted = str(rules.memory.precision)
    if wanted != "auto":
        if wanted not in PRECISIONS:
            raise ValueError(f"plan.memory.precision={wanted!r} is not a precision; use auto, {', '.join(PRECISIONS)}")
        return wanted, "set by plan.memory.precision"
    if rules.get("gpu"):
        bf16_gpus = {str(name).lower() for name in rules.get("bf16_gpus") or []}
        if str(rules.gpu).lower() in bf16_gpus:
            return "bf16-mixed", f"plan.gpu={rules.gpu} has bf16 units (plan.bf16_gpus)"
        return "16-mixed", f"plan.gpu={rules.gpu} is not in plan.bf16_gpus: float16 autocast"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if cuda_supports_bf16():
            return "bf16-mixed", f"this machine's GPU ({name}) has bf16 units"
        return "16-mixed", f"this machine's GPU ({name}) has no bf16 units: float16 autocast"
    return "16-mixed", ("no plan.gpu and no GPU here: float16 autocast, which every CUDA GPU runs "
                        "(plan.gpu=NAME of a bf16 card, or plan.memory.precision=bf16-mixed, plans bf16)")


def training_precision(requested: str, plan_config: dict, on_gpu: bool, gpu_bf16=cuda_supports_bf16) -> tuple[str, str]:
    """(precision, why) a run trains at: ``requested`` unless it is ``plan``, then the plan's precision for this
    device. On a GPU without bf16 units the plan's bf16-mixed becomes 16-mixed (the same memory); on a CPU a GPU's
    precision becomes 32-true (no float16 autocast there, and bf16 is slow on CPUs without bf16 units) unless the
    plan measured its choice on a CPU (a budget configuration). ``gpu_bf16``: asked only when it matters."""
    if requested != "plan":
        return requested, "trainer.precision"
    # plans.json from before per-configuration precisions: the precision its memory was traced at
    planned = str(plan_config.get("precision") or plan_config["memory"]["precision"])
    sized = plan_config.get("sized_for") or {}
    if on_gpu:
        if planned == "bf16-mixed" and not gpu_bf16():
            return "16-mixed", "the plan's bf16-mixed, but this GPU has no bf16 units: 16-mixed (the same memory)"
        return planned, "the plan's precision"
    if planned == "32-true" or (sized.get("device") == "cpu" and sized.get("throughput") == "measured"):
        return planned, "the plan's precision" + (" (measured on a CPU)" if sized.get("device") == "cpu" else "")
    return "32-true", (f"the plan's {planned} is for a GPU; on a CPU 32-true (trainer.precision=bf16-mixed where "
                       "this CPU has bf16 units)")


def check_step_memory(plans: dict, configuration: str, precision: str, batch_size: int | None = None,
                      dataset: str = "DATASET", patch_size: list[int] | None = None,
                      encoder: dict | None = None) -> int | None:
    """Warn when the step at ``precision`` (and ``batch_size``, default the plan's) no longer fits the memory budget
    the plan was fitted to: the predicted peak, the budget and the fix. ``encoder`` (``StepSpec`` fields ``encoder``
    and ``blocks_per_stage`` of the network trained) other than the plan's is always warned of, with the traced
    peak of that network: the plan's patch and batch were fitted to its own. Returns the predicted peak bytes, or
    None where nothing changed from the plan's own trace (or the precision cannot be traced)."""
    conf = plans["configurations"][configuration]
    memory = conf["memory"]
    traced = TRACEABLE.get(str(precision))
    batch = int(batch_size or conf["batch_size"])
    planned = TRACEABLE.get(str(memory["precision"]), memory["precision"])
    same_bytes = traced == planned or {traced, planned} <= {"16-mixed", "bf16-mixed"}  # 2-byte activations alike
    patch = tuple(int(p) for p in (patch_size or conf["patch_size"]))
    plan_spec = spec_from_plan(plans, configuration, batch)
    network = {**network_encoder(conf["network"]), **(encoder or {})}
    other_network = network != network_encoder(conf["network"])
    if traced is None or (same_bytes and batch == int(conf["batch_size"]) and patch == tuple(conf["patch_size"])
                          and not other_network):
        return None
    spec = replace(plan_spec, precision=traced, patch_size=patch, **network)
    try:
        peak = traced_peak_bytes(spec)
    except Exception as exc:  # e.g. a patch the network's pooling cannot divide: training says so itself
        log.info("the %s step at patch %s could not be traced (%s); its memory is not checked", configuration,
                 list(patch), str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None
    budget = MemoryBudget(float(memory["gpu_memory_gb"]), memory["reserved_bytes"] / GIB, float(memory["margin"]))
    replan = (f"plan for this network (`segforge plan {dataset} plan=resenc_m`, resenc_l or resenc_xl, or "
              f"plan.encoder={spec.encoder})")
    if budget.fits(peak):
        if other_network:
            log.warning("model.encoder=%s (blocks %s) is not the plan's %s encoder: its %s step, traced at batch %d, "
                        "patch %s, peaks at %.2f GiB, within the %.2f GiB the plan's memory budget allows (a %g GB "
                        "card), but the plan's patch and batch were fitted to its own network. To fit them to this "
                        "one: %s", spec.encoder, list(spec.blocks_per_stage or []) or "default",
                        plan_spec.encoder, configuration, batch, list(patch), peak / GIB,
                        budget.peak_limit_bytes / GIB, memory["gpu_memory_gb"], replan)
        return peak
    # activations grow linearly with the batch, weights and optimizer state do not: two traces give the slope
    single = traced_peak_bytes(replace(spec, batch_size=1)) if batch > 1 else peak
    per_sample = (peak - single) / (batch - 1) if batch > 1 else peak
    fitting = 1 + int((budget.peak_limit_bytes - single) // max(per_sample, 1)) if budget.fits(single) else 0
    fixes = ([replan] if other_network else []) \
        + ([] if same_bytes else [f"re-plan at this precision (`segforge plan {dataset} plan.memory.precision={traced}`)"]) \
        + ([f"data.batch_size={min(fitting, batch - 1)}"] if fitting else [])
    log.warning("trainer.precision=%s, batch %d, patch %s%s: the %s step is predicted to peak at %.2f GiB, over the "
                "%.2f GiB the plan's memory budget allows (a %g GB card; the plan traced %s at batch %d, patch %s). "
                "Fix: %s", precision, batch, list(patch),
                f", model.encoder={spec.encoder} (the plan's: {plan_spec.encoder})" if other_network else "",
                configuration, peak / GIB, budget.peak_limit_bytes / GIB,
                memory["gpu_memory_gb"], memory["precision"], conf["batch_size"], list(conf["patch_size"]),
                ", or ".join(fixes or ["a smaller data.patch_size (or none: the plan's)"]))
    return peak
