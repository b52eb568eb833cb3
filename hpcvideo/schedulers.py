"""Schedulers: one diffusers scheduler per block in flight, and their exact state for checkpoints.

UniPC (``UniPCMultistepScheduler``, Wan2.1's default, flow-matching sigmas) is multistep: it keeps
the last model outputs, so every block in the DualParal queue owns its own copy (as DualParal's
official code does with deep copies). ``flow_euler`` is ``FlowMatchEulerDiscreteScheduler``.

The state of a scheduler is its instance dictionary minus the frozen config: tensors, lists of
tensors, numbers and None. :func:`scheduler_state` / :func:`load_scheduler_state` move it through
``torch.save``/``torch.load(weights_only=True)`` unchanged, so a resumed block continues with the
same bits.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

SCHEDULERS = ("unipc", "flow_euler")


def make_scheduler(name: str, *, scheduler_config: dict, flow_shift: float, num_inference_steps: int, device="cpu"):
    """A scheduler ready for step 0, with timesteps set (mirrors WanPipeline: set_timesteps then
    set_begin_index(0)).

    ``scheduler_config`` is the model folder's ``scheduler/scheduler_config.json``; for ``unipc``
    it is used as is with ``flow_shift`` overridden (DualParal does the same); ``flow_euler`` builds
    ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` with the folder's ``num_train_timesteps``.
    Raises ValueError for an unknown name.
    """
    if name == "unipc":
        config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        config["flow_shift"] = flow_shift
        scheduler = UniPCMultistepScheduler.from_config(config)
    elif name == "flow_euler":
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)), shift=flow_shift
        )
    else:
        raise ValueError(f"sampling.scheduler={name!r} is not one of {SCHEDULERS}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    scheduler.set_begin_index(0)
    return scheduler


def fresh_copy(template):
    """An independent scheduler at step 0 (a deep copy of a template made by make_scheduler)."""
    return copy.deepcopy(template)


def scheduler_state(scheduler) -> dict[str, Any]:
    """Everything that changes while stepping, as plain objects (tensors cloned to CPU)."""
    return {k: _to_cpu(v) for k, v in vars(scheduler).items() if k != "_internal_dict"}


def load_scheduler_state(template, state: dict[str, Any], device="cpu"):
    """A copy of ``template`` whose state is replaced by ``state`` (from :func:`scheduler_state`)."""
    scheduler = copy.deepcopy(template)
    for key, value in state.items():
        reference = getattr(template, key, None)  # keep tensors where the scheduler keeps them (UniPC: sigmas on CPU)
        target = reference.device if isinstance(reference, torch.Tensor) else device
        setattr(scheduler, key, _to_device(value, target))
    return scheduler


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (list, tuple)):
        return [_to_cpu(v) for v in value]
    return value


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value
