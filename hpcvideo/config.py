"""The run configuration: a typed tree of kw_only dataclasses, read from YAML, validated once.

Sources, in order of application (later wins)::

    preset or YAML file or dict  ->  overrides "key.path=value"  ->  num_frames / seed / output

Every value is checked in :func:`_build` before anything heavy happens (no torch import here, so a
SLURM submit fails fast on the login node). All problems are collected and raised together as one
:class:`ConfigError`, one line each, naming the dotted key, the value given and what is allowed::

    video.num_frames=0 is out of range; allowed: any whole number >= 1

Frame arithmetic (:mod:`hpcvideo.layout`; Wan VAE: the first pixel frame alone, then 4 pixel frames per
latent frame). Any num_frames >= 1; the strategy generates whole blocks and the store keeps num_frames::

    num_latent_frames = ceil((num_frames - 1) / 4) + 1        (unet3d: num_frames)
    num_blocks        = ceil(num_latent_frames / block_latent_frames)
    block j covers latent frames [j*n, (j+1)*n); its first pixel frame is 0 (j = 0) or 4*(j*n - 1) + 1

The config object is plain data: treat it as read-only after :func:`load_config` (to change a value,
load again with an override, or ``RunConfig.from_dict`` an edited ``to_dict()``, which re-validates).
"""

from __future__ import annotations

import bisect
import copy
import difflib
import importlib.resources
import math
import os
import re
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError", "PromptEntry", "ModelConfig", "VideoConfig", "SamplingConfig", "StrategyConfig",
    "StoreConfig", "RuntimeConfig", "ClusterConfig", "RunConfig", "load_config", "validate_config",
    "list_presets", "config_diff", "identity_dict", "format_diff", "IDENTITY_IGNORED", "PRESETS_DIR",
    "MISSING",
]

# Package data (installed with the wheel; ``configs/`` at the repository's top level links here):
# presets by name (``hpcvideo generate demo-cpu``) and the shipped demo model (``model.path: demo``).
PRESETS_DIR = Path(str(importlib.resources.files("hpcvideo") / "configs"))
DEMO_WEIGHTS_DIR = Path(str(importlib.resources.files("hpcvideo") / "demo" / "weights"))  # hpcvideo.demo.model

MODEL_FAMILIES = ("wan", "unet3d")  # unet3d: ModelScope/Zeroscope/VideoCrafter2 (Video-Infinity only)
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("unipc", "flow_euler")  # same names as hpcvideo.schedulers.SCHEDULERS
STRATEGIES = ("dualparal", "videoinfinity")
UNET3D_SCHEDULERS = ("ddim", "dpmsolver")  # the names models.family.UNet3DFamily.make_scheduler takes
NOISE_MODES = ("coordinated", "independent")  # same names as hpcvideo.noise.NOISE_MODES
DEVICES = ("auto", "cpu", "cuda")
CLUSTER_MPI = ("pmi2", "pmix")  # srun --mpi=...: pmi2 for MPICH-based MPI (the mpich wheel), pmix for Open MPI
# sbatch options derived from the cluster section (or set by the launcher): not allowed in cluster.sbatch_options
SBATCH_OPTIONS_SET = (
    "nodes", "ntasks-per-node", "ntasks", "gpus-per-node", "gres", "cpus-per-task", "mem", "time", "partition",
    "account", "qos", "constraint", "signal", "requeue", "job-name", "output", "error", "array", "open-mode",
)
_SBATCH_OPTION_RE = re.compile(r"^[a-z][a-z0-9-]*$")
SEED_LIMIT = 2**63

# Wan2.1's standard negative prompt (the English version used in its model cards).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)


class ConfigError(ValueError):
    """Invalid configuration. ``errors`` lists every problem found (one string each)."""

    def __init__(self, errors: Iterable[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        n = len(self.errors)
        head = f"invalid configuration ({n} error{'s' if n != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  {e}" for e in self.errors)]))

    def __reduce__(self):  # pickle (e.g. across MPI ranks) by the list, not the joined message
        return (type(self), (self.errors,))


# --------------------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class PromptEntry:
    """One entry of the prompt schedule: ``prompt`` applies from pixel frame ``from_frame`` on.

    A block takes the prompt of the last entry starting at or before the block's first pixel frame,
    so prompts switch at block boundaries.
    """

    from_frame: int  # pixel frame index (0-based) from which this prompt applies
    prompt: str  # the text prompt


@dataclass(kw_only=True)
class ModelConfig:
    """``model``: which diffusion model to load."""

    family: str = "wan"  # "wan" (Wan2.1/2.2 DiT, diffusers format) | "unet3d" (ModelScope/Zeroscope/VideoCrafter2 UNet3D)
    # "tiny": built-in tiny random-weight Wan (built on first use); "demo": the small trained Wan shipped in
    # the package (hpcvideo/demo/weights, 64 x 64 pixels, see hpcvideo.demo); else a local diffusers folder
    path: str = "tiny"
    dtype: str = "bfloat16"  # compute dtype of the transformer: float32 | bfloat16 | float16
    # unet3d only: frames-per-second condition of a VideoCrafter2 conversion (its unet weights carry an
    # fps_embedding; VideoCrafter2 / Video-Infinity use 24); null = no fps condition (ModelScope/Zeroscope)
    fps_condition: float | None = None


@dataclass(kw_only=True)
class VideoConfig:
    """``video``: the output video."""

    # pixel frames, any whole number >= 1 (the strategy generates whole blocks/clips and the store keeps
    # exactly num_frames). The default 93 = 24 latent frames = 3 whole blocks of 8
    num_frames: int = 93
    height: int = 480  # pixels; a positive multiple of 16 (VAE 8x times patch 2x)
    width: int = 832  # pixels; a positive multiple of 16
    fps: float = 16.0  # frames per second of the exported video (Wan is trained at 16)


@dataclass(kw_only=True)
class SamplingConfig:
    """``sampling``: the denoising loop.

    YAML shorthand: ``prompt: TEXT`` means ``prompts: [{from_frame: 0, prompt: TEXT}]``.
    """

    seed: int = 0  # 0 <= seed < 2**63; all noise is a pure function of (seed, block index)
    num_inference_steps: int = 50  # denoising steps per block (= ticks a block spends in the queue)
    guidance_scale: float = 5.0  # classifier-free guidance weight; <= 1 disables CFG (one forward per step)
    scheduler: str = "unipc"  # unipc (Wan's default, multistep) | flow_euler
    flow_shift: float = 3.0  # sigma shift of the flow-matching schedule (Wan: 3.0 at 480p, 5.0 at 720p)
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # used when guidance_scale > 1
    max_sequence_length: int = 512  # text tokens per prompt (umT5; Wan uses 512)
    prompts: list[PromptEntry] = field(default_factory=list)  # prompt schedule, from_frame strictly increasing from 0


@dataclass(kw_only=True)
class StrategyConfig:
    """``strategy``: how the video is split and denoised (DualParal block-wise denoising)."""

    name: str = "dualparal"  # dualparal (Wan only) | videoinfinity (wan or unet3d)
    block_latent_frames: int = 8  # latent frames per block (n); the last block may reach past the video (not stored)
    context_latent_frames: int = 2  # latent frames of the previous block prepended to a block (c); 0 <= c <= n
    feature_cache: bool = True  # reuse the next block's self-attention keys/values instead of recomputing
    noise_init: str = "coordinated"  # coordinated (reshuffled base window) | independent
    # --- videoinfinity (arXiv 2406.16260): rank r denoises clip r; one clip per rank (world size = number of clips)
    # latent frames per rank (unet3d: latent frames = pixel frames); null = derived from the rank count,
    # ceil(num_latent_frames / world_size) (the store records the derived value). A set value needs
    # ceil(num_latent_frames / clip_latent_frames) ranks
    clip_latent_frames: int | None = None
    local_frames: int = 8  # frames each side of a query frame in its local attention window (paper: 8 + 8)
    global_frames: int = 16  # frames in the global set shared by all ranks (paper: 16); 0 = none
    switch_timestep: float = 800.0  # t >= this: global keys favoured by global_bias; below: local keys (paper: 800)
    global_bias: float = 10.0  # logit bias of the favoured scope (paper: 10)
    sync_clips: bool = True  # false: every rank denoises its clip as a video of its own (no halos, global set or
    #                          shared GroupNorm statistics): the independent-clips baseline for seam comparisons


@dataclass(kw_only=True)
class StoreConfig:
    """``store``: the Zarr run store and how often it is checkpointed."""

    path: str | None = None  # run store folder, e.g. runs/x.zarr (relative to the caller's CWD); required to run
    checkpoint_every_ticks: int = 4  # save queue state at least every this many ticks
    checkpoint_every_s: float = 300.0  # ... and at least every this many seconds of wall time
    heartbeat_every_s: float = 5.0  # each rank's heartbeat for `hpcvideo status`: at most this often (s)


@dataclass(kw_only=True)
class RuntimeConfig:
    """``runtime``: the process on each rank."""

    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    num_threads: int = 0  # torch intra-op CPU threads per rank; 0 = torch's default
    # transformer blocks per pipeline stage (one count per rank, summing to the model's blocks);
    # null = contiguous split with the remainder to the first stages. Not part of the run's identity:
    # a run may resume on another number of ranks.
    stage_layers: list[int] | None = None
    # seconds a rank waits on a peer (torch.distributed timeout) before it gives up and the job is
    # aborted: covers a hung, not a dead, peer (a dead one is noticed at once). Must exceed the
    # longest pause of one rank between messages (rank 0: checkpoint + decode flush).
    timeout_s: float = 600.0


@dataclass(kw_only=True)
class ClusterConfig:
    """``cluster``: SLURM resources (one MPI rank per GPU)."""

    nodes: int = 1  # number of nodes
    gpus_per_node: int = 1  # GPUs (= ranks) per node
    cpus_per_task: int = 8  # CPU cores per rank
    mem_gb: int = 64  # host memory per node, GiB
    timeout_min: int = 240  # wall-time limit of one job, minutes (the run requeues and resumes after it)
    partition: str | None = None  # SLURM partition; None = the cluster's default
    account: str | None = None  # SLURM account; None = the user's default
    qos: str | None = None  # SLURM quality of service; None = the default
    constraint: str | None = None  # SLURM node features, e.g. "a100&ib"; None = any node
    request_gpus: bool = True  # ask SLURM for gpus_per_node GPUs per node; false: CPU nodes (ranks only)
    mpi: str = "pmi2"  # srun --mpi flavour: pmi2 (MPICH, the mpich wheel, Intel MPI) | pmix (Open MPI)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun, e.g. "module load cuda/12.4"
    sbatch_options: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options, e.g. {mail-type: END}
    signal_delay_s: int = 120  # USR2 comes this many seconds before the time limit (must exceed one tick + checkpoint)
    max_timeouts: int = 20  # requeues after hitting timeout_min before the job gives up (preemptions do not count)
    log_folder: str | None = None  # submitit logs; None = <store.path>.slurm
    gpu_mem_gb: float | None = None  # memory of one GPU, GiB (e.g. 80 for an H100); None = not checked by submit/plan


@dataclass(kw_only=True)
class RunConfig:
    """The whole run: one validated tree. Build it with :func:`load_config` or :meth:`from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def num_latent_frames(self) -> int:
        """Latent frames the video needs: ceil((num_frames - 1) / 4) + 1 (Wan VAE, first frame alone);
        num_frames for the unet3d family (per-frame 2-D VAE). See :mod:`hpcvideo.layout`."""
        from .layout import latent_frames_for

        return latent_frames_for(max(1, self.video.num_frames), self.model.family)

    @property
    def num_blocks(self) -> int:
        """Number of DualParal blocks: ceil(num_latent_frames / block_latent_frames) (videoinfinity: clips,
        ceil(num_latent_frames / clip_latent_frames), which is also the number of ranks; a null clip
        length raises ValueError: resolve it first with :func:`hpcvideo.layout.resolve_config`)."""
        return -(-self.num_latent_frames // self._unit_latent_frames)

    def block_first_frame(self, j: int) -> int:
        """First pixel frame of block ``j``: 0 for j == 0, else 4 * (j * n - 1) + 1 (n = block_latent_frames).

        Block j holds latent frames [j*n, (j+1)*n); latent frame i > 0 decodes to pixel frames
        4*(i-1)+1 .. 4*i, latent frame 0 to pixel frame 0 alone.
        """
        if j < 0:
            raise ValueError(f"block index j={j} must be >= 0")
        if self.model.family == "unet3d":  # videoinfinity clip j, one pixel frame per latent frame
            return j * self._unit_latent_frames
        return 0 if j == 0 else 4 * (j * self._unit_latent_frames - 1) + 1

    @property
    def _unit_latent_frames(self) -> int:
        """Latent frames of a block (dualparal) or a clip (videoinfinity; ValueError while derived)."""
        from .layout import unit_latent_frames

        return unit_latent_frames(self)

    def prompt_index_for_block(self, j: int) -> int:
        """Index into ``sampling.prompts`` of the last entry with from_frame <= block_first_frame(j)."""
        starts = [p.from_frame for p in self.sampling.prompts]
        index = bisect.bisect_right(starts, self.block_first_frame(j)) - 1
        if index < 0:
            raise ValueError(f"no prompt covers block {j} (sampling.prompts must start at from_frame 0)")
        return index

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable; prompts as a list of dicts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Validated config from a nested dict (as saved by :meth:`to_dict`); paths are not checked."""
        return _build(copy.deepcopy(dict(d)), check_paths=False)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunConfig)}  # type: ignore[misc]
_HINTS: dict[type, dict[str, Any]] = {cls: get_type_hints(cls) for cls in (*_SECTIONS.values(), PromptEntry)}


def _valid_keys(section: str) -> list[str]:
    keys = [f.name for f in fields(_SECTIONS[section])]
    return keys + ["prompt"] if section == "sampling" else keys


# ----------------------------------------------------------------------------------- type checks


def _unknown(key: str, valid: Sequence[str], section: str | None) -> str:
    """``unknown key 'video.num_frame' (did you mean 'video.num_frames'? valid keys in 'video': ...)``."""
    name = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(name)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    where = f"valid keys in '{section}'" if section else "valid sections"
    return f"unknown key '{key}' ({hint}{where}: {', '.join(valid)})"


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(get_args(tp))
    return tp, False


def _wrong_type(key: str, value: Any, allowed: str) -> str:
    return f"{key}={value!r} has the wrong type ({type(value).__name__}); allowed: {allowed}"


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(key: str, value: Any, tp: Any) -> tuple[Any, str | None]:
    """(value converted to ``tp``, None) or (None, error). int rejects bool and non-integral floats."""
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None, None
    allowed = _TYPE_WORDS[tp] + (" or null" if optional else "")
    wrong = _wrong_type(key, value, allowed)
    if tp is bool:
        return (value, None) if isinstance(value, bool) else (None, wrong)
    if tp is str:
        return (value, None) if isinstance(value, str) else (None, wrong)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, wrong
    if tp is int:
        if isinstance(value, float):
            if not value.is_integer():
                return None, f"{key}={value!r} is not a whole number; allowed: {allowed}"
            value = int(value)
        return value, None
    if not math.isfinite(value):
        return None, f"{key}={value!r} is not finite; allowed: a finite number"
    return float(value), None


def _parse_prompts(key: str, value: Any, errors: list[str]) -> list[PromptEntry] | None:
    """``[{from_frame: 0, prompt: ...}, ...]`` -> list of PromptEntry, or None (errors appended)."""
    form = "a list of {from_frame: INT, prompt: TEXT} entries"
    if not isinstance(value, (list, tuple)):
        errors.append(_wrong_type(key, value, form))
        return None
    entries, ok, valid = [], True, list(_HINTS[PromptEntry])
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, PromptEntry):
            item = asdict(item)
        if not isinstance(item, Mapping):
            errors.append(_wrong_type(where, item, "{from_frame: INT, prompt: TEXT}"))
            ok = False
            continue
        kwargs = {}
        for k, v in item.items():
            if k not in valid:
                errors.append(_unknown(f"{where}.{k}", valid, where))
                ok = False
                continue
            kwargs[k], err = _coerce(f"{where}.{k}", v, _HINTS[PromptEntry][k])
            if err:
                errors.append(err)
                ok = False
        for k in valid:
            if k not in item:
                errors.append(f"{where}.{k} is missing; allowed: {{from_frame: INT, prompt: TEXT}}")
                ok = False
        if ok:
            entries.append(PromptEntry(**kwargs))
    return entries if ok else None


def _build_section(name: str, value: Any, errors: list[str], bad: set[str]) -> Any:
    """One section dataclass from its raw mapping; bad keys get defaults and are recorded in ``bad``."""
    cls, valid = _SECTIONS[name], _valid_keys(name)
    if value is None:  # "video:" with nothing under it
        value = {}
    if not isinstance(value, Mapping):
        errors.append(_wrong_type(name, value, f"a mapping with keys {', '.join(valid)}"))
        bad.update(f"{name}.{k}" for k in valid)
        return cls()
    value = dict(value)
    if name == "sampling" and "prompt" in value:
        text = value.pop("prompt")
        if "prompts" in value:
            errors.append(
                f"sampling.prompt={text!r} and sampling.prompts are both given; allowed: one of them "
                "(sampling.prompt: TEXT is short for sampling.prompts: [{from_frame: 0, prompt: TEXT}])"
            )
            bad.add("sampling.prompts")
        elif not isinstance(text, str):
            errors.append(_wrong_type("sampling.prompt", text, "a string"))
            bad.add("sampling.prompts")
        else:
            value["prompts"] = [{"from_frame": 0, "prompt": text}]
    kwargs = {}
    for key, raw in value.items():
        dotted = f"{name}.{key}"
        if key not in _HINTS[cls]:
            errors.append(_unknown(dotted, valid, name))
            continue
        if dotted == "sampling.prompts":
            parsed, err = _parse_prompts(dotted, raw, errors), None
            if parsed is None:
                bad.add(dotted)
                continue
        elif dotted in ("cluster.setup", "cluster.sbatch_options"):
            parsed, err = _parse_cluster_list_or_map(dotted, raw)
        elif dotted == "runtime.stage_layers":
            parsed, err = raw, None
            if raw is not None and not (
                isinstance(raw, list) and raw and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in raw)
            ):
                parsed, err = None, _wrong_type(dotted, raw, "a list of positive integers (blocks per rank) or null")
        else:
            parsed, err = _coerce(dotted, raw, _HINTS[cls][key])
        if err:
            errors.append(err)
            bad.add(dotted)
            continue
        kwargs[key] = parsed
    return cls(**kwargs)


# ---------------------------------------------------------------------------------- value checks


def _nearest(value: int, step: int, offset: int, minimum: int) -> str:
    """The allowed values (offset + k*step >= minimum) just below and above ``value``, as 'a or b'."""
    lower = (value - offset) // step * step + offset
    options = [v for v in (lower, lower + step) if v >= minimum] or [minimum]
    return " or ".join(map(str, options))


def _check_values(cfg: RunConfig, bad: set[str]) -> list[str]:
    """Enums, ranges and cross-field rules on a typed config; keys in ``bad`` are skipped."""
    errors: list[str] = []

    def ok(*keys: str) -> bool:
        return not any(k in bad for k in keys)

    def fail(key: str, message: str) -> None:
        errors.append(message)
        bad.add(key)

    def one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
        if ok(key) and value not in allowed:
            fail(key, f"{key}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")

    def at_least(key: str, value: Any, lo: int) -> None:
        if ok(key) and value < lo:
            fail(key, f"{key}={value!r} is out of range; allowed: >= {lo}")

    def positive(key: str, value: Any) -> None:
        if ok(key) and not value > 0:
            fail(key, f"{key}={value!r} is out of range; allowed: > 0")

    m, v, s, st = cfg.model, cfg.video, cfg.sampling, cfg.strategy
    one_of("model.family", m.family, MODEL_FAMILIES)
    one_of("model.dtype", m.dtype, DTYPES)
    if ok("model.path") and not m.path:
        fail("model.path", "model.path='' is empty; allowed: 'tiny' or a diffusers-format model folder")
    if ok("model.fps_condition", "model.family") and m.fps_condition is not None:
        if m.family != "unet3d":
            fail("model.fps_condition", f"model.fps_condition={m.fps_condition!r} is for model.family='unet3d' "
                 f"(VideoCrafter2), not {m.family!r}; allowed: null")
        elif not m.fps_condition > 0:
            fail("model.fps_condition", f"model.fps_condition={m.fps_condition!r} is out of range; allowed: > 0 or null")

    if ok("video.num_frames") and v.num_frames < 1:
        fail("video.num_frames", f"video.num_frames={v.num_frames} is out of range; allowed: any whole number >= 1")
    for key in ("height", "width"):
        size = getattr(v, key)
        if ok(f"video.{key}") and (size < 16 or size % 16):
            nearest = _nearest(size, 16, 0, 16)
            fail(f"video.{key}", f"video.{key}={size} is not a positive multiple of 16; nearest allowed: {nearest}")
    positive("video.fps", v.fps)

    if ok("sampling.seed") and not 0 <= s.seed < SEED_LIMIT:
        fail("sampling.seed", f"sampling.seed={s.seed} is out of range; allowed: 0 <= seed < 2**63")
    at_least("sampling.num_inference_steps", s.num_inference_steps, 1)
    if ok("sampling.guidance_scale") and s.guidance_scale < 0:
        fail("sampling.guidance_scale",
             f"sampling.guidance_scale={s.guidance_scale!r} is out of range; allowed: >= 0 (<= 1 disables guidance)")
    one_of("sampling.scheduler", s.scheduler, UNET3D_SCHEDULERS if m.family == "unet3d" else SCHEDULERS)
    positive("sampling.flow_shift", s.flow_shift)
    at_least("sampling.max_sequence_length", s.max_sequence_length, 1)
    if ok("sampling.prompts"):
        errors.extend(_check_prompts(s.prompts))

    one_of("strategy.name", st.name, STRATEGIES)
    one_of("strategy.noise_init", st.noise_init, NOISE_MODES)
    at_least("strategy.block_latent_frames", st.block_latent_frames, 1)
    at_least("strategy.context_latent_frames", st.context_latent_frames, 0)
    n, c = st.block_latent_frames, st.context_latent_frames
    if ok("strategy.block_latent_frames", "strategy.context_latent_frames") and c > n:
        errors.append(
            f"strategy.context_latent_frames={c} is larger than strategy.block_latent_frames={n} "
            f"(the context is taken from the previous block); allowed: 0 <= strategy.context_latent_frames <= {n}"
        )
    if ok("strategy.name", "model.family") and st.name == "dualparal" and m.family != "wan":
        fail("strategy.name", f"strategy.name='dualparal' needs model.family='wan', not {m.family!r}; "
             "allowed for this family: 'videoinfinity'")
    if ok("strategy.name") and st.name == "videoinfinity":
        errors.extend(_check_videoinfinity(cfg, ok, fail))
    derived = st.name == "videoinfinity" and st.clip_latent_frames is None  # clips known once the ranks are
    if ok("video.num_frames", "strategy.block_latent_frames", "sampling.prompts") and s.prompts and not errors \
            and not derived:
        _warn_unused_prompts(cfg)

    if ok("store.path") and cfg.store.path == "":
        fail("store.path", "store.path='' is empty; allowed: a folder path such as runs/NAME.zarr, or null")
    at_least("store.checkpoint_every_ticks", cfg.store.checkpoint_every_ticks, 1)
    positive("store.checkpoint_every_s", cfg.store.checkpoint_every_s)
    positive("store.heartbeat_every_s", cfg.store.heartbeat_every_s)

    one_of("runtime.device", cfg.runtime.device, DEVICES)
    at_least("runtime.num_threads", cfg.runtime.num_threads, 0)
    positive("runtime.timeout_s", cfg.runtime.timeout_s)

    for key in ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        at_least(f"cluster.{key}", getattr(cfg.cluster, key), 1)
    for key in ("partition", "account", "qos", "constraint"):
        if ok(f"cluster.{key}") and getattr(cfg.cluster, key) == "":
            fail(f"cluster.{key}", f"cluster.{key}='' is empty; allowed: a name, or null for the default")
    for key in ("partition", "account", "qos", "constraint", "log_folder"):
        value = getattr(cfg.cluster, key)
        if ok(f"cluster.{key}") and value is not None and ("\n" in value or "\0" in value):
            fail(f"cluster.{key}", f"cluster.{key}={value!r} contains a line break; allowed: one line")
    one_of("cluster.mpi", cfg.cluster.mpi, CLUSTER_MPI)
    if ok("cluster.gpu_mem_gb") and cfg.cluster.gpu_mem_gb is not None:
        positive("cluster.gpu_mem_gb", cfg.cluster.gpu_mem_gb)
    at_least("cluster.signal_delay_s", cfg.cluster.signal_delay_s, 1)
    at_least("cluster.max_timeouts", cfg.cluster.max_timeouts, 0)
    if ok("cluster.signal_delay_s", "cluster.timeout_min") and cfg.cluster.signal_delay_s >= cfg.cluster.timeout_min * 60:
        fail("cluster.signal_delay_s", f"cluster.signal_delay_s={cfg.cluster.signal_delay_s} is not shorter than "
             f"cluster.timeout_min={cfg.cluster.timeout_min} minutes; allowed: < {cfg.cluster.timeout_min * 60}")
    if ok("runtime.device") and cfg.runtime.device == "cuda" and not cfg.cluster.request_gpus:
        fail("cluster.request_gpus", "cluster.request_gpus=False with runtime.device='cuda': the ranks would get no GPU; "
             "allowed: true, or runtime.device cpu/auto")
    return errors


def _parse_cluster_list_or_map(key: str, raw: Any) -> tuple[Any, str | None]:
    """``cluster.setup``: a list of one-line shell commands; ``cluster.sbatch_options``: {option: value}
    where option is an sbatch long option without ``--`` that the cluster section does not set
    itself, and value is text, a number or true (a flag such as ``exclusive: true``)."""
    if key == "cluster.setup":
        allowed = "a list of one-line shell commands, e.g. ['module load cuda/12.4']"
        if not isinstance(raw, list) or not all(isinstance(line, str) for line in raw):
            return None, _wrong_type(key, raw, allowed)
        for i, line in enumerate(raw):
            if "\n" in line or "\r" in line or "\0" in line:
                return None, f"{key}[{i}]={line!r} contains a line break; allowed: {allowed}"
        return list(raw), None
    allowed = ("a mapping {option: value} of sbatch long options without '--' (e.g. {mail-type: END, exclusive: true}), "
               f"not one the cluster section sets ({', '.join(SBATCH_OPTIONS_SET)})")
    if not isinstance(raw, Mapping):
        return None, _wrong_type(key, raw, allowed)
    out = {}
    for option, value in raw.items():
        name = str(option).replace("_", "-")
        if not isinstance(option, str) or not _SBATCH_OPTION_RE.match(name):
            return None, f"{key}: option {option!r} is not an sbatch long option name; allowed: {allowed}"
        if name in SBATCH_OPTIONS_SET:
            return None, f"{key}: option {option!r} is set by the cluster section itself; allowed: {allowed}"
        if value is False or value is None or isinstance(value, (list, dict)) or (
            isinstance(value, str) and ("\n" in value or "\r" in value or "\0" in value)
        ):
            return None, f"{key}.{option}={value!r} is not allowed; allowed: one-line text, a number, or true for a flag"
        out[name] = value
    return out, None


def _check_videoinfinity(cfg: RunConfig, ok, fail) -> list[str]:
    """strategy.* keys of Video-Infinity (the clip layout against the rank count: :func:`hpcvideo.layout.ranks_problem`)."""
    st, errors = cfg.strategy, []
    for key in ("clip_latent_frames", "local_frames", "global_frames"):
        low = 1 if key == "clip_latent_frames" else 0
        value = getattr(st, key)
        if ok(f"strategy.{key}") and value is not None and value < low:
            extra = " or null (derived from the rank count)" if key == "clip_latent_frames" else ""
            fail(f"strategy.{key}", f"strategy.{key}={value!r} is out of range; allowed: >= {low}{extra}")
    if ok("strategy.global_bias") and st.global_bias < 0:
        fail("strategy.global_bias", f"strategy.global_bias={st.global_bias!r} is out of range; allowed: >= 0")
    return errors


def _check_prompts(prompts: list[PromptEntry]) -> list[str]:
    if not prompts:
        return [
            "sampling.prompts=[] is empty; allowed: a non-empty list of {from_frame: INT, prompt: TEXT} starting at "
            "from_frame 0 (or the shorthand sampling.prompt: TEXT)"
        ]
    errors = []
    if prompts[0].from_frame != 0:
        errors.append(f"sampling.prompts[0].from_frame={prompts[0].from_frame} is not allowed; "
                      "allowed: 0 (the first prompt starts the video)")
    for i in range(1, len(prompts)):
        a, b = prompts[i - 1].from_frame, prompts[i].from_frame
        if b <= a:
            errors.append(
                f"sampling.prompts[{i}].from_frame={b} must be greater than sampling.prompts[{i - 1}].from_frame={a}: "
                "prompt schedule out of order"
            )
    for i, p in enumerate(prompts):
        if not p.prompt.strip():
            errors.append(f"sampling.prompts[{i}].prompt={p.prompt!r} is empty; allowed: a non-empty string")
    return errors


def _warn_unused_prompts(cfg: RunConfig) -> None:
    """Prompts switch at block starts: one warning for the schedule entries that no block of this video uses."""
    used = {cfg.prompt_index_for_block(j) for j in range(cfg.num_blocks)}
    unused = [(i, p) for i, p in enumerate(cfg.sampling.prompts) if i not in used]
    if not unused:
        return
    starts = [cfg.block_first_frame(j) for j in range(min(cfg.num_blocks, 8))]
    (i, p), more = unused[0], len(unused) - 1
    entries = f"sampling.prompts[{i}] (from_frame={p.from_frame})"
    if more:
        last, q = unused[-1]
        entries += f" and {more} more (up to sampling.prompts[{last}], from_frame={q.from_frame})"
    warnings.warn(
        f"{entries} {'are' if more else 'is'} used by no block of this video and ignored: "
        f"prompts switch at block starts (pixel frames {', '.join(map(str, starts))}"
        f"{', ...' if cfg.num_blocks > 8 else ''}; video.num_frames={cfg.video.num_frames})",
        stacklevel=4,
    )


def _check_paths(cfg: RunConfig, bad: set[str]) -> list[str]:
    """model.path exists as a diffusers folder; store.path is set and creatable. Creates nothing."""
    errors = []
    path = cfg.model.path
    if "model.path" not in bad and "model.family" not in bad and path == "demo" and cfg.model.family != "wan":
        errors.append(f"model.path='demo' is a Wan model; model.family={cfg.model.family!r} does not match "
                      "(allowed with model.path='demo': model.family='wan')")
    elif "model.path" not in bad and path == "demo" and not (DEMO_WEIGHTS_DIR / "model_index.json").is_file():
        errors.append(f"model.path='demo': the shipped demo weights are missing ({DEMO_WEIGHTS_DIR}); "
                      "reinstall hpcvideo or run `hpcvideo train-demo`")
    if "model.path" not in bad and path not in ("tiny", "demo"):
        allowed = ("allowed: 'tiny' (built-in tiny random-weight model), 'demo' (shipped trained demo model) "
                   "or a diffusers-format model folder containing model_index.json")
        p = Path(path)
        if not p.exists():
            where = f"relative paths are taken from {os.getcwd()}"
            errors.append(f"model.path={path!r} does not exist ({where}); {allowed}")
        elif not p.is_dir():
            errors.append(f"model.path={path!r} is not a directory; {allowed}")
        elif not (p / "model_index.json").is_file():
            errors.append(f"model.path={path!r} has no model_index.json (not a diffusers-format folder); {allowed}")
    if "store.path" not in bad:
        if cfg.store.path is None:
            errors.append("store.path=None is not set: pass --output or set store.path "
                          "(allowed: a folder path such as runs/NAME.zarr)")
        else:
            problem = _store_path_problem(Path(cfg.store.path))
            if problem:
                allowed = "an existing run store folder or a new path in a writable directory"
                errors.append(f"store.path={cfg.store.path!r} {problem}; allowed: {allowed}")
    return errors


def _store_path_problem(p: Path) -> str | None:
    try:
        if p.exists():
            if not p.is_dir():
                return "exists and is not a directory"
            if not os.access(p, os.W_OK | os.X_OK):
                return "is a directory that is not writable"
            return None
        ancestor = p.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as e:
        return f"cannot be checked ({e})"
    if not ancestor.is_dir():
        return f"cannot be created: {str(ancestor)!r} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: nearest existing folder {str(ancestor)!r} is not writable"
    return None


def _build(raw: Any, *, check_paths: bool, errors: Sequence[str] = ()) -> RunConfig:
    """The one place where a raw nested dict becomes a validated RunConfig (or one ConfigError)."""
    errors = list(errors)
    if not isinstance(raw, Mapping):
        raise ConfigError(errors + [_wrong_type("config", raw, f"a mapping with sections {', '.join(_SECTIONS)}")])
    bad: set[str] = set()
    for name in raw:
        if name not in _SECTIONS:
            errors.append(_unknown(str(name), list(_SECTIONS), None))
    sections = {name: _build_section(name, raw.get(name), errors, bad) for name in _SECTIONS}
    cfg = RunConfig(**sections)
    errors += _check_values(cfg, bad)
    if check_paths:
        errors += _check_paths(cfg, bad)
    if errors:
        raise ConfigError(errors)
    return cfg


def validate_config(cfg: RunConfig, *, check_paths: bool = False) -> RunConfig:
    """Re-validate a RunConfig built or edited in code (round trip through :meth:`RunConfig.to_dict`)."""
    return _build(cfg.to_dict(), check_paths=check_paths)


# ------------------------------------------------------------------------------ sources, overrides


def list_presets() -> list[str]:
    """Names of the presets shipped in the package (``tiny-cpu`` for ``hpcvideo/configs/tiny-cpu.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError([f"config file {str(path)!r} cannot be read: {e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        sections = ", ".join(_SECTIONS)
        kind = type(data).__name__
        raise ConfigError([f"config file {str(path)!r} holds a {kind}; allowed: a mapping with sections {sections}"])
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: 'expected ',' or ']' (line 2, column 1)'."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(str(getattr(e, "problem", None) or e).split()) + where


def _read_source(source: Any) -> dict[str, Any]:
    if isinstance(source, RunConfig):
        return source.to_dict()
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return _read_yaml(path)
        name = os.fspath(source)
        name = name[: -len(".yaml")] if name.endswith(".yaml") else name
        preset = PRESETS_DIR / f"{name}.yaml"
        if "/" not in name and os.sep not in name and preset.is_file():
            return _read_yaml(preset)
        presets = ", ".join(list_presets())
        name = os.fspath(source)
        raise ConfigError([f"config source {name!r} is neither a YAML file nor a preset; presets: {presets}"])
    raise ConfigError([_wrong_type("config source", source, "a YAML path, a preset name or a dict")])


def _field_type(parts: Sequence[str]) -> Any:
    """Declared type of the dotted key, or None if it is not a field (``sampling.prompt`` is str)."""
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        return None
    if list(parts) == ["sampling", "prompt"]:
        return str
    return _HINTS[_SECTIONS[parts[0]]].get(parts[1])


def _apply_override(raw: dict[str, Any], text: Any, errors: list[str]) -> None:
    """Set ``key.path=value`` in ``raw``. The value is YAML; a str field keeps the raw text where YAML
    gives a non-string (``sampling.prompt=Night: a cat`` stays text, not a mapping)."""
    if not isinstance(text, str) or "=" not in text:
        errors.append(f"malformed override {text!r}; allowed: KEY.PATH=VALUE, e.g. sampling.seed=1")
        return
    key, _, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        errors.append(f"malformed override {text!r}: empty key; allowed: KEY.PATH=VALUE, e.g. sampling.seed=1")
        return
    if len(parts) > 2 and _field_type(parts[:2]) is not None:
        errors.append(f"override {text!r}: '{'.'.join(parts[:2])}' is a value, not a section")
        return
    tp, optional = _unwrap_optional(_field_type(parts))
    try:
        value = yaml.safe_load(value_text)
        if tp is str and not isinstance(value, str) and not (value is None and optional):
            value = value_text.strip()
        if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
    except yaml.YAMLError as e:
        if tp is not str:
            errors.append(f"override {text!r}: the value is not valid YAML: {_yaml_problem(e)}")
            return
        value = value_text.strip()
    _set_dotted(raw, parts, value, errors)


def _set_dotted(raw: dict[str, Any], parts: Sequence[str], value: Any, errors: list[str]) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            errors.append(f"override of '{'.'.join(parts)}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
            return
        node = child
    node[parts[-1]] = value
    if list(parts) == ["sampling", "prompt"]:  # a later prompt replaces an earlier schedule, and vice versa
        node.pop("prompts", None)
    elif list(parts) == ["sampling", "prompts"]:
        node.pop("prompt", None)


def load_config(
    source: str | os.PathLike | Mapping[str, Any],
    overrides: Iterable[str] = (),
    *,
    num_frames: int | None = None,
    seed: int | None = None,
    output: str | os.PathLike | None = None,
    check_paths: bool = True,
) -> RunConfig:
    """Read, override and validate a run configuration.

    Args:
        source: a YAML file path, a preset name (``"tiny-cpu"`` -> ``hpcvideo/configs/tiny-cpu.yaml``, shipped in the package)
            or a nested dict. Missing sections and keys take their defaults.
        overrides: ``"key.path=value"`` strings, applied in order; the value is parsed as YAML
            (``sampling.guidance_scale=3`` -> 3). Setting ``sampling.prompt`` replaces a
            ``sampling.prompts`` schedule from the source, and vice versa.
        num_frames, seed, output: shortcuts for ``video.num_frames``, ``sampling.seed``, ``store.path``
            (applied after ``overrides``).
        check_paths: also check that ``model.path`` is "tiny" or a diffusers folder and that
            ``store.path`` is set and creatable (relative paths against the CWD; nothing is created).

    Raises:
        ConfigError: listing every problem, one per line.
    """
    raw = _read_source(source)
    errors: list[str] = []
    if isinstance(overrides, str):  # a lone "key=value" is one override, not a sequence of characters
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text, errors)
    for key, value in (("video.num_frames", num_frames), ("sampling.seed", seed), ("store.path", output)):
        if value is not None:
            _set_dotted(raw, key.split("."), os.fspath(value) if isinstance(value, os.PathLike) else value, errors)
    return _build(raw, check_paths=check_paths, errors=errors)


# ------------------------------------------------------------------------------- comparing configs

MISSING = "<missing>"
IDENTITY_IGNORED = ("video.num_frames", "store", "runtime", "cluster")
"""Keys that may differ between a run store and the command that resumes or extends it."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == i or key.startswith(i + ".") for i in ignore)


def config_diff(
    a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = (), *, defaults: Mapping[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    """Differing dotted keys of two nested dicts, sorted: ``[(key, a_value, b_value), ...]``.

    Lists are compared as whole values; a key absent on one side takes its value from ``defaults``
    (a nested dict, e.g. ``RunConfig().to_dict()``: a store written before a key existed ran with its
    default) or else shows as ``"<missing>"``; ``ignore`` holds dotted keys or section names
    (``"store"`` ignores ``store.path`` etc.).
    """
    ignore = tuple(ignore)
    fa, fb = _flatten(a), _flatten(b)
    fd = _flatten(defaults) if defaults is not None else {}
    diff = []
    for key in sorted(fa.keys() | fb.keys()):
        if _is_ignored(key, ignore):
            continue
        va, vb = fa.get(key, fd.get(key, MISSING)), fb.get(key, fd.get(key, MISSING))
        if (key in fa) != (key in fb) and key in fd:
            if va != vb:
                diff.append((key, va, vb))
            continue
        if va != vb or (key in fa) != (key in fb):
            diff.append((key, va, vb))
    return diff


def identity_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``d`` without the keys of :data:`IDENTITY_IGNORED` (what must match to resume)."""
    out = copy.deepcopy(dict(d))
    for key in IDENTITY_IGNORED:
        *parents, last = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def format_diff(diff: Iterable[tuple[str, Any, Any]]) -> str:
    """One line per key: ``  sampling.seed: store has 0, command has 1``."""

    def show(v: Any) -> str:
        return v if v == MISSING else repr(v)

    return "\n".join(f"  {key}: store has {show(a)}, command has {show(b)}" for key, a, b in diff)
