"""The run configuration's schema: the typed tree of kw_only dataclasses and the allowed names.

Every config key is a field here (its comment gives units and allowed values); the allowed names
of the enumerated keys are defined here once and imported by the modules that act on them
(:mod:`hpcvideo.schedulers`, :mod:`hpcvideo.noise`, :mod:`hpcvideo.runtime.env`, the strategies),
because those import torch and this package must not (a SLURM submit fails fast on a login node).

Derived values (``num_latent_frames``, ``num_blocks``, ``block_first_frame``) are the frame
arithmetic of :mod:`hpcvideo.layout`, exposed as properties of :class:`RunConfig`.
"""

from __future__ import annotations

import bisect
import copy
import importlib.resources
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

# Package data (installed with the wheel; ``configs/`` at the repository's top level links here):
# presets by name (``hpcvideo generate demo-cpu``) and the shipped demo model (``model.path: demo``).
PRESETS_DIR = Path(str(importlib.resources.files("hpcvideo") / "configs"))
DEMO_WEIGHTS_DIR = Path(str(importlib.resources.files("hpcvideo") / "demo" / "weights"))  # hpcvideo.demo.model

MODEL_FAMILIES = ("wan", "unet3d")  # unet3d: ModelScope/Zeroscope/VideoCrafter2 (Video-Infinity only)
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("unipc", "flow_euler")  # Wan schedulers: hpcvideo.schedulers.make_scheduler
STRATEGIES = ("dualparal", "videoinfinity")  # each has its rules in strategies/<name>/config_rules.py
UNET3D_SCHEDULERS = ("ddim", "dpmsolver")  # the names models.family.UNet3DFamily.make_scheduler takes
NOISE_MODES = ("coordinated", "independent")  # initial noise: hpcvideo.noise.block_noise
DEVICES = ("auto", "cpu", "cuda")  # hpcvideo.runtime.env.init_rank_env
TEXT_ENCODER_DEVICES = ("rank", "cpu")  # model.text_encoder_device (hpcvideo.runner, hpcvideo.plan)
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
    # where rank 0 runs the text encoder: "rank" (the rank's device, runtime.device) | "cpu" (host memory;
    # Wan's --t5_cpu: the GPU never holds the encoder). Freed after the prompts are encoded either way
    text_encoder_device: str = "rank"


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
    # two-expert models (Wan2.2 A14B): the weight of the low-noise expert's steps; null = guidance_scale
    guidance_scale_2: float | None = None
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
    # the global phase (global keys favoured by global_bias; then the local ones) as a fraction of the denoising
    # steps: the first round(fraction * num_inference_steps) steps (halves round up), the same share on any schedule
    # (shifted flow matching, DDIM, DPM-Solver); paper: t >= 800 of 30 steps from t = 999 = the first 6 = 0.2.
    # null: switch at the raw timestep switch_timestep instead (the released code's form)
    switch_fraction: float | None = 0.2
    switch_timestep: float = 800.0  # with switch_fraction null only: t >= this is the global phase (paper: 800)
    # the query frame's own tokens keep the favoured bias in the global phase; false: the released code, whose
    # global bias also lowers them (on Wan: the frame's own spatial tokens)
    exempt_own_frame: bool = True
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
    num_threads: int = 0  # torch intra-op CPU threads per rank; 0 = torch's default / ranks on the node
    # transformer blocks per pipeline stage (one count per rank, summing to the model's blocks);
    # null = contiguous split with the remainder to the first stages. Not part of the run's identity:
    # a run may resume on another number of ranks.
    stage_layers: list[int] | None = None
    # classifier-free guidance's cond and uncond branches on two halves of the ranks (each a full pipeline
    # of world_size / 2 stages; stage_layers then splits one half): 2x the ranks on one video, same bits
    cfg_parallel: bool = False
    # DualParal's VAE decode with several ranks: "auto" (blocks spread over the ranks for a chunk-local VAE, else
    # rank 0 streams them) | "rows" (every rank decodes a band of rows of every block: memory per rank ~1/N of a
    # frame's activations; uint8 frames within 1 of the single-rank decode)
    vae_decode: str = "auto"
    # seconds a rank waits on a peer (torch.distributed timeout) before it gives up and the job is
    # aborted: covers a hung, not a dead, peer (a dead one is noticed at once). Must exceed the
    # longest pause of one rank between messages (rank 0: checkpoint + decode flush).
    timeout_s: float = 600.0
    # seconds without a heartbeat from the ranks of another node before they count as lost (the job then
    # ends, naming them); only for jobs on several nodes. Must exceed the longest stall of a rank's process.
    heartbeat_timeout_s: float = 30.0


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
class ConditionConfig:
    """``condition``: what the video starts from besides the prompt."""

    # an image file (PNG/JPEG/...) the video starts from: Wan2.2 TI2V (expand_timesteps) takes its VAE latent
    # as the first latent frame, at timestep 0 (as diffusers' WanImageToVideoPipeline); null = text only
    image: str | None = None
    # SHA-256 of the image file's bytes: derived (filled in from the file when the run is resolved), so a
    # changed image at the same path is a different run and is not resumed
    image_sha256: str | None = None
    # continue a video: its last frames (encoded with the model's VAE) become the context of the first block
    # (DualParal, strategy.context_latent_frames of them): an mp4 file, or a run store's frames; null = none
    init_video: str | None = None
    init_store: str | None = None
    init_sha256: str | None = None  # derived: SHA-256 of the init video's file, or of the store's frames used


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
    condition: ConditionConfig = field(default_factory=ConditionConfig)

    @property
    def num_latent_frames(self) -> int:
        """Latent frames the video needs: ceil((num_frames - 1) / 4) + 1 (Wan VAE, first frame alone);
        num_frames for the unet3d family (per-frame 2-D VAE). See :mod:`hpcvideo.layout`."""
        from ..layout import latent_frames_for

        return latent_frames_for(max(1, self.video.num_frames), self.model.family)

    @property
    def num_blocks(self) -> int:
        """Number of DualParal blocks: ceil(num_latent_frames / block_latent_frames) (videoinfinity: clips,
        ceil(num_latent_frames / clip_latent_frames), which is also the number of ranks; a null clip
        length raises ValueError: resolve it first with :func:`hpcvideo.layout.resolve_config`)."""
        from ..layout import num_units

        return num_units(self)

    def block_first_frame(self, j: int) -> int:
        """First pixel frame of block ``j``: 0 for j == 0, else 4 * (j * n - 1) + 1 (n = block_latent_frames;
        unet3d: j * n). See :func:`hpcvideo.layout.block_frame_range`.

        Block j holds latent frames [j*n, (j+1)*n); latent frame i > 0 decodes to pixel frames
        4*(i-1)+1 .. 4*i, latent frame 0 to pixel frame 0 alone.
        """
        from ..layout import block_frame_range, temporal_factor

        if j < 0:
            raise ValueError(f"block index j={j} must be >= 0")
        factor = temporal_factor(self.model.family)
        if j == 0 and factor > 1:  # Wan: block 0 starts the video whatever its (maybe still derived) length
            return 0
        return block_frame_range(j, self._unit_latent_frames, factor)[0]

    @property
    def _unit_latent_frames(self) -> int:
        """Latent frames of a block (dualparal) or a clip (videoinfinity; ValueError while derived)."""
        from ..layout import unit_latent_frames

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
        from .validate import build

        return build(copy.deepcopy(dict(d)), check_paths=False)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunConfig)}  # type: ignore[misc]
_HINTS: dict[type, dict[str, Any]] = {cls: get_type_hints(cls) for cls in (*_SECTIONS.values(), PromptEntry)}


def _valid_keys(section: str) -> list[str]:
    keys = [f.name for f in fields(_SECTIONS[section])]
    return keys + ["prompt"] if section == "sampling" else keys
