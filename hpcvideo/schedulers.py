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

from .config.schema import SCHEDULERS  # the allowed sampling.scheduler names (Wan), defined once


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


def scheduler_state(scheduler, template=None) -> dict[str, Any]:
    """Everything that changes while stepping, as plain objects (tensors cloned to CPU).

    With ``template`` (the step-0 scheduler it was copied from), attributes still equal to the
    template's (UniPC's 1000-entry alpha/sigma tables, ...) are left out; :func:`load_scheduler_state`
    takes them from the template again.
    """
    state = {}
    for key, value in vars(scheduler).items():
        if key == "_internal_dict" or (template is not None and _same(value, getattr(template, key, _ABSENT))):
            continue
        state[key] = _to_cpu(value)
    return state


_ABSENT = object()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
        )
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


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
