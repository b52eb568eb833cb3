"""``hpcvideo plan``: memory, traffic and time per rank of a DualParal run, without loading weights.

Per rank r (pipeline stage r, transformer blocks ``layers[r]``; B blocks, T steps, n block and c
context latent frames, K = min(B, T) blocks in flight, g = 2 CFG branches or 1, D hidden size,
F FFN size, p = tokens per latent frame = (h/2)(w/2), b = bytes per element of ``model.dtype``)::

    weights      exact parameter bytes of the stage (its blocks + the shared embeddings/head every
                 stage holds), counted on a meta-device model built from transformer/config.json;
                 a two-expert model (Wan2.2 A14B) counts the stage's slice of both experts;
                 rank 0 also holds the VAE (float32) and, while prompts are encoded, the text encoder
    activations  one block forward at a time: S = (c + n) p tokens (+ c p cached K/V tokens);
                 g S (6 D + F) b  (residual, norm, q, k, v, attention out; FFN hidden) + SDPA without
                 an S x S matrix (fused attention); per-token timesteps (Wan2.2 TI2V) add
                 S 6 D 4 (a block's float32 modulation) + 4 S 7 D b (the last 4 windows' embeddings)
    caches       feature cache (strategies/dualparal/attention.py): K/V of c p tokens per own layer
                 and branch, for two blocks at a time (the one being appended, the one being
                 recorded): min(K, 2) g 2 (c p) D b |layers[r]|
    queue        rank 0, between ticks (the checkpointed state): latents + scheduler state of the
                 blocks in flight + the tail block, float32: :func:`queue_tensors` x C n h w 4 (UniPC:
                 4 (K - 1) tensors); within a tick one more block (Q = 4 tensors) is counted under
                 activations;
                 every stage: the tick's incoming hidden states, K g S D b
    bytes/tick   (steady state) rank r -> r+1: sum over the tick's items of g (c_ctx + n) p D b;
                 rank N-1 -> 0: K C n h w b (noise_pred), the formula of strategies/dualparal/pipeline.py
                 measured in bench/bench_pipeline.py
    time/tick    FLOPs of the stage for one tick / throughput (``--tflops`` given, or measured:
                 ``--from-store RUN.zarr`` divides that run's FLOPs per tick by its seconds per tick)

Memory figures are checked against measured ones in tests/test_plan.py (tiny presets: exact weight
and queue bytes, bytes per tick equal to the pipeline's counters).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, RunConfig

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# float32 tensors of (C, n, h, w) per block in the queue: latents (+ UniPC: 2 model outputs + last sample)
QUEUE_TENSORS_PER_BLOCK = {"unipc": 4, "flow_euler": 1}


def queue_tensors(scheduler: str, blocks_in_flight: int) -> int:
    """(C, n, h, w) float32 tensors of rank 0's queue between two ticks (the checkpointed state), at
    its largest: K - 1 blocks stay in flight across a tick boundary, block j after s steps holds
    latents + last sample + min(s, 2) model outputs (UniPC), and the tail block's latents stay for
    context: 4 (K - 1) with UniPC (K >= 2), K with flow_euler (latents only)."""
    k = blocks_in_flight
    if scheduler == "flow_euler":
        return k
    return 4 * (k - 1) if k >= 2 else 1
CUDA_CONTEXT_GB = 0.5  # CUDA context + allocator slack per GPU, GiB (added to the fit check)


@dataclass(kw_only=True)
class RankPlan:
    """One rank's figures (bytes; per tick = per step of the queue/clips). Memory is counted per phase,
    as the runner goes through them (:meth:`phases`): a term is added to another only where both are
    held at once. A new term is a new field plus its line in :meth:`phases`."""

    rank: int
    layers: tuple[int, int]
    weights_bytes: int
    vae_bytes: int
    text_encoder_bytes: int  # held only while prompts are encoded (rank 0), then freed
    activations_bytes: int
    caches_bytes: int
    queue_bytes: int
    sent_bytes_per_tick: int  # steady state
    sent_bytes_total: int  # whole run
    flops_per_tick: float
    seconds_per_tick: float | None = None
    text_encoder_activations_bytes: int = 0  # one prompt through the encoder (rank 0)
    embeddings_bytes: int = 0  # the prompt schedule's embeddings every rank holds during the run
    text_encoder_on: str = "device"  # "device" (model.text_encoder_device=rank) | "host" (=cpu)
    device_is_host: bool = False  # runtime.device cpu: the rank's device and the host are one memory
    clip: tuple[int, int] | None = None  # Video-Infinity: latent frames [start, stop) of this rank's clip
    checkpoint_bytes: int = 0  # pages of the mapped checkpoint files resident at the worst moment of the load
    load_weights_bytes: int | None = None  # weights already loaded at that moment (None: all of them)
    sent_bytes_per_tick_by_kind: dict = field(default_factory=dict)  # Video-Infinity: halo, global, sum

    def phases(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{phase: {"device": {term: bytes}, "host": {term: bytes}}}`` in run order (hpcvideo.runner):
        ``encode`` (rank 0 loads the text encoder and encodes the prompts one at a time; nothing of the
        run is loaded yet, and the encoder is freed before it is), ``load`` (the denoiser's weights
        arrive on the device while its safetensors files are memory-mapped on the host: the pages of
        this rank's tensors stay resident until the file is closed; they count in a process's RSS, as
        file pages the kernel may reclaim) and ``run`` (the loaded stage or model, the VAE, one
        forward's activations, the caches and the queue or clip state). "host": terms in host memory
        while the device is a GPU (the encoder with model.text_encoder_device=cpu; the mapped files)."""
        encode = {"text_encoder": self.text_encoder_bytes, "text_encoder_activations": self.text_encoder_activations_bytes}
        run = {"weights": self.weights_bytes, "vae": self.vae_bytes, "activations": self.activations_bytes,
               "caches": self.caches_bytes, "queue": self.queue_bytes, "embeddings": self.embeddings_bytes}
        out = {}
        if self.text_encoder_bytes:
            on_host = self.text_encoder_on == "host"
            out["encode"] = {"device": {} if on_host else encode, "host": encode if on_host else {}}
        loaded = self.weights_bytes if self.load_weights_bytes is None else self.load_weights_bytes
        out["load"] = {"device": {"weights": loaded, "embeddings": self.embeddings_bytes},
                       "host": {"checkpoint_pages": self.checkpoint_bytes}}
        out["run"] = {"device": run, "host": {}}
        return out

    def _peak(self, where: tuple[str, ...]) -> tuple[int, str]:
        return max((sum(sum(phase[w].values()) for w in where), name) for name, phase in self.phases().items())

    @property
    def peak_bytes(self) -> int:
        """The rank's device memory at its fullest phase (with runtime.device cpu: all of the rank's memory)."""
        return self._peak(("device", "host") if self.device_is_host else ("device",))[0]

    @property
    def peak_phase(self) -> str:
        return self._peak(("device", "host") if self.device_is_host else ("device",))[1]

    @property
    def host_peak_bytes(self) -> int:
        """What the plan puts in host memory at once besides the device's share (0 when the device is the host)."""
        return 0 if self.device_is_host else self._peak(("host",))[0]


@dataclass(kw_only=True)
class Plan:
    model_id: str
    num_ranks: int
    num_blocks: int
    num_ticks: int
    blocks_in_flight: int
    tokens_per_block_forward: int
    ranks: list[RankPlan] = field(default_factory=list)
    throughput_tflops: float | None = None

    strategy: str = "dualparal"
    text_encoder_device: str = "rank"

    def as_dict(self) -> dict:
        """Every field, and per rank its ``phases``, ``peak_bytes``, ``peak_phase`` and ``host_peak_bytes``."""
        d = asdict(self)
        for r, rank in zip(d["ranks"], self.ranks):
            r.update(phases=rank.phases(), peak_bytes=rank.peak_bytes, peak_phase=rank.peak_phase,
                     host_peak_bytes=rank.host_peak_bytes)
        return d


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def checkpoint_tensor_bytes(folder: Path, *, by_file: bool = False) -> dict:
    """``{tensor name: bytes as stored}`` of the safetensors files in ``folder`` (their JSON headers only:
    no tensor is read), or with ``by_file`` ``{file name: {tensor name: bytes}}``; empty when the folder
    has none (a folder of configs only)."""
    import json
    import struct

    files: dict[str, dict[str, int]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        files[file.name] = {name: meta["data_offsets"][1] - meta["data_offsets"][0]
                            for name, meta in header.items() if name != "__metadata__"}
    return files if by_file else {k: v for tensors in files.values() for k, v in tensors.items()}


def stage_load_peak(files: dict[str, dict[str, int]], wanted, weights_bytes: int) -> tuple[int, int]:
    """(weights loaded, checkpoint pages resident) at the fullest moment of a stage load
    (:func:`hpcvideo.models.load_wan_transformer_stage`: the shards one after the other, each mapped
    until the next is opened, every tensor copied off it): the end of shard i, holding the pages of
    the stage's tensors in shard i and the weights from shards <= i (in proportion to their stored bytes)."""
    own = {f: sum(v for k, v in tensors.items() if wanted(k)) for f, tensors in files.items()}
    total = sum(own.values())
    best, done = (0, 0), 0
    for f in sorted(files):
        done += own[f]
        candidate = (weights_bytes * done // total if total else weights_bytes, own[f])
        if sum(candidate) > sum(best):
            best = candidate
    return best


def _param_bytes(module, dtype_bytes: int, keep_fp32: tuple[str, ...] = ()) -> dict[str, int]:
    """Bytes per top-level child (``blocks.<i>`` per block) of a meta-device module."""
    out: dict[str, int] = {}
    for name, param in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        fp32 = any(k in parts for k in keep_fp32)
        out[key] = out.get(key, 0) + param.numel() * (4 if fp32 else dtype_bytes)
    for name, buf in module.named_buffers():
        key = name.split(".")[0]
        out[key] = out.get(key, 0) + buf.numel() * buf.element_size()
    return out


def model_bytes(model_path: Path, dtype: str, sequence_length: int = 512) -> dict:
    """Exact parameter bytes from the model's JSON configs (meta device: nothing is read or allocated):
    ``{"transformer": {child: bytes}, "vae": bytes, "text_encoder": bytes, "text_encoder_activations": bytes}``
    (the activation peak of one prompt of ``sequence_length`` tokens, :mod:`hpcvideo.dryrun`), and
    ``"transformer_2"`` (the same per child) for a two-expert model (Wan2.2 A14B)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    b = DTYPE_BYTES[dtype]
    with init_empty_weights(include_buffers=False):
        transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(model_path / "transformer"))
        vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(model_path / "vae"))
    keep = tuple(WanTransformer3DModel._keep_in_fp32_modules or ())
    out = {"transformer": _param_bytes(transformer, b, keep), "vae": sum(p.numel() * 4 for p in vae.parameters())}
    if (model_path / "transformer_2" / "config.json").is_file():
        from .models import read_model_info

        if "transformer_2" in read_model_info(model_path)["experts"]:
            with init_empty_weights(include_buffers=False):
                second = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(model_path / "transformer_2"))
            out["transformer_2"] = _param_bytes(second, b, keep)
    text_config = model_path / "text_encoder" / "config.json"
    out["text_encoder"] = out["text_encoder_activations"] = 0
    if text_config.is_file():
        from transformers import AutoConfig, UMT5EncoderModel

        from .dryrun import encoder_activation_bytes

        with init_empty_weights(include_buffers=True):
            encoder = UMT5EncoderModel(AutoConfig.from_pretrained(model_path / "text_encoder"))
        encoder.tie_weights()  # embed_tokens is shared's tensor once loaded: count it once
        out["text_encoder"] = sum(p.numel() * b for p in encoder.parameters())
        from .models.family import DTYPES

        out["text_encoder_activations"] = encoder_activation_bytes(encoder.to(DTYPES[dtype]).eval(), sequence_length)
    return out


PLANNED = {"dualparal": ("wan",), "videoinfinity": ("wan", "unet3d")}  # strategy -> model families plan covers


def _check_supported(cfg: RunConfig) -> None:
    if cfg.model.family not in PLANNED.get(cfg.strategy.name, ()):
        covered = "; ".join(f"strategy {k} with model.family {' or '.join(v)}" for k, v in PLANNED.items())
        raise ConfigError([f"strategy.name={cfg.strategy.name!r} (model.family={cfg.model.family!r}): hpcvideo plan "
                           f"covers {covered}"])


def check_plan(cfg: RunConfig, num_ranks: int | None = None) -> RunConfig:
    """What ``hpcvideo plan`` checks before planning: the strategy is one the plan covers, then
    :func:`hpcvideo.check.validate_for_model` on ``num_ranks`` (default: cluster.nodes x gpus_per_node;
    given, the plan splits the blocks evenly, so ``runtime.stage_layers`` is not used) without the store
    and memory checks (the memory verdict is the plan's own, :func:`check_fits`). Raises ConfigError."""
    from .check import validate_for_model

    _check_supported(cfg)
    cluster_ranks = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if num_ranks is None:
        what = (f"cluster.nodes={cfg.cluster.nodes} x cluster.gpus_per_node={cfg.cluster.gpus_per_node} = "
                f"{cluster_ranks} rank(s): ")
    else:
        what = f"--ranks {num_ranks}: "
        if cfg.runtime.stage_layers is not None:
            d = cfg.to_dict()
            d["runtime"]["stage_layers"] = None
            cfg = RunConfig.from_dict(d)
    return validate_for_model(cfg, num_ranks or cluster_ranks, what=what, check_store=False, check_memory=False)


def make_plan(cfg: RunConfig, *, num_ranks: int | None = None, throughput_tflops: float | None = None,
              model_bytes_cache: dict | None = None) -> Plan:
    """The per-rank plan of ``cfg`` on ``num_ranks`` ranks (default: cluster.nodes x gpus_per_node; given,
    the blocks are split evenly and ``runtime.stage_layers`` is not used). Check ``cfg`` first with
    :func:`check_plan`; a layout that cannot run raises ConfigError here too."""
    from .check import model_folder
    from .models import read_model_info
    from .strategies.dualparal.pipeline import split_layers
    from .strategies.dualparal.queue import num_ticks, tick_plan

    _check_supported(cfg)
    ranks = num_ranks or cfg.cluster.nodes * cfg.cluster.gpus_per_node
    model_path = model_folder(cfg)
    if cfg.strategy.name == "videoinfinity":
        from .plan_videoinfinity import make_videoinfinity_plan

        return make_videoinfinity_plan(cfg, num_ranks=ranks, model_path=model_path, throughput_tflops=throughput_tflops)
    info = read_model_info(model_path)
    sizes = model_bytes_cache if model_bytes_cache is not None else model_bytes(
        model_path, cfg.model.dtype, cfg.sampling.max_sequence_length)
    if cfg.runtime.cfg_parallel:
        from .plan_cfg_parallel import check_ranks

        check_ranks(cfg, ranks)
    stages = ranks // 2 if cfg.runtime.cfg_parallel else ranks  # one pipeline's ranks (hpcvideo.plan_cfg_parallel)
    try:
        layers = split_layers(info["num_layers"], stages, cfg.runtime.stage_layers if num_ranks is None else None)
    except ValueError as error:
        raise ConfigError([str(error)]) from None
    b = DTYPE_BYTES[cfg.model.dtype]
    st, s = cfg.strategy, cfg.sampling
    n, c = st.block_latent_frames, st.context_latent_frames
    scale = info["vae_scale_factor_spatial"]
    h, w = cfg.video.height // scale, cfg.video.width // scale
    pt, ph, pw = info["patch_size"]
    p = (h // ph) * (w // pw)
    C, D, F = info["latent_channels"], info["hidden_dim"], info["ffn_dim"]
    g = 2 if s.guidance_scale > 1.0 and not cfg.runtime.cfg_parallel else 1  # branches one pipeline runs
    B, T = cfg.num_blocks, s.num_inference_steps
    K = min(B, T)
    S = (c + n) * p
    cache_tokens = c * p if (st.feature_cache and c > 0) else 0
    ticks = num_ticks(B, T)
    # steady-state tick: the fullest tick with every block having its context (as bench_pipeline does)
    steady = max(range(ticks), key=lambda t: (len(tick_plan(t, num_blocks=B, num_inference_steps=T,
                                                             context_latent_frames=c, feature_cache=st.feature_cache)), t >= T))
    items = tick_plan(steady, num_blocks=B, num_inference_steps=T, context_latent_frames=c, feature_cache=st.feature_cache)
    hidden_bytes = sum(g * ((c if wk.context_from is not None else 0) + n) * p * D * b for wk in items)
    feedback_bytes = len(items) * C * n * h * w * b
    experts = [sizes[name] for name in info.get("experts", ["transformer"])]  # a stage holds its slice of each
    tensors = sizes["transformer"]
    shared = sum(v for e in experts for k, v in e.items() if not k.startswith("blocks."))
    block_bytes = [sum(e[f"blocks.{i}"] for e in experts) for i in range(info["num_layers"])]
    # ~parameters per block of the expert a forward runs (fp32 norms counted once more: negligible)
    block_params = [tensors[f"blocks.{i}"] / b for i in range(info["num_layers"])]
    per_block = QUEUE_TENSORS_PER_BLOCK.get(s.scheduler, 4)
    total_hidden = total_feedback = 0
    for t in range(ticks):
        work = tick_plan(t, num_blocks=B, num_inference_steps=T, context_latent_frames=c, feature_cache=st.feature_cache)
        total_hidden += sum(g * ((c if wk.context_from is not None else 0) + n) * p * D * b for wk in work)
        total_feedback += len(work) * C * n * h * w * b
    # per-token timesteps (expand_timesteps, Wan2.2 TI2V): a block's float32 (S, 6, D) modulation, and the
    # (S, 6, D) + (S, D) condition embeddings the stage keeps for the last 4 windows (forward.ConditionCache)
    token_time = S * 6 * D * 4 + 4 * S * 7 * D * b if info.get("expand_timesteps") else 0
    plan = Plan(model_id=info["model_id"], num_ranks=ranks, num_blocks=B, num_ticks=ticks, blocks_in_flight=K,
                tokens_per_block_forward=S, throughput_tflops=throughput_tflops,
                text_encoder_device=cfg.model.text_encoder_device)
    embeddings = (len(s.prompts) + (1 if s.guidance_scale > 1.0 else 0)) * s.max_sequence_length * info["text_dim"] * b
    stored = checkpoint_tensor_bytes(model_path / "transformer", by_file=True)
    for r, rng in enumerate(layers):
        own = len(rng)
        flops = 0.0
        for wk in items:
            tokens = ((c if wk.context_from is not None else 0) + n) * p
            kv = tokens + (cache_tokens if wk.append else 0)
            per_layer = 2 * tokens * sum(block_params[i] for i in rng) / max(own, 1) + 4 * tokens * kv * D
            flops += g * per_layer * own
        rank = RankPlan(
            rank=r, layers=(rng.start, rng.stop),
            weights_bytes=shared + sum(block_bytes[i] for i in rng),
            **dict(zip(("load_weights_bytes", "checkpoint_bytes"), stage_load_peak(
                stored, lambda k, rng=rng: k.split(".")[0] != "blocks" or int(k.split(".")[1]) in rng,
                shared + sum(block_bytes[i] for i in rng)))),
            vae_bytes=sizes["vae"] if r == 0 else 0,
            text_encoder_bytes=sizes["text_encoder"] if r == 0 else 0,
            text_encoder_activations_bytes=sizes.get("text_encoder_activations", 0) if r == 0 else 0,
            text_encoder_on="host" if cfg.model.text_encoder_device == "cpu" else "device",
            device_is_host=cfg.runtime.device == "cpu",
            embeddings_bytes=embeddings,
            activations_bytes=g * S * (6 * D + F) * b + (per_block * C * n * h * w * 4 if r == 0 else 0) + token_time,
            caches_bytes=min(K, 2) * g * 2 * cache_tokens * D * b * own,
            queue_bytes=(queue_tensors(s.scheduler, K) * C * n * h * w * 4 if r == 0 else 0) + (K * g * S * D * b if r > 0 else 0),
            sent_bytes_per_tick=0 if stages == 1 else (feedback_bytes if r == stages - 1 else hidden_bytes),
            sent_bytes_total=0 if stages == 1 else (total_feedback if r == stages - 1 else total_hidden),
            flops_per_tick=flops,
            seconds_per_tick=flops / (throughput_tflops * 1e12) if throughput_tflops else None,
        )
        plan.ranks.append(rank)
    if cfg.runtime.cfg_parallel:
        from .plan_cfg_parallel import add_uncond_group

        add_uncond_group(plan, cfg, items=items, num_ticks_=ticks, latent_shape=(C, h, w), dtype_bytes=b)
    return plan


def throughput_from_store(cfg: RunConfig, store_path: str) -> float:
    """Effective TFLOP/s of a finished run (its timings.seconds_per_tick and its own plan)."""
    from .store import RunStore

    store = RunStore.open(store_path, mode="r")
    seconds = float(store.attrs["timings"]["seconds_per_tick"])
    run_cfg = RunConfig.from_dict(store.attrs["config"])
    run_plan = make_plan(run_cfg, num_ranks=int(store.attrs.get("num_ranks", 1)))
    return max(r.flops_per_tick for r in run_plan.ranks) / seconds / 1e12


def fits(plan: Plan, gpu_mem_gb: float) -> bool:
    return all(r.peak_bytes + CUDA_CONTEXT_GB * GIB <= gpu_mem_gb * GIB for r in plan.ranks)


def check_fits(plan: Plan, cfg: RunConfig) -> None:
    """ConfigError when a rank's peak exceeds ``cluster.gpu_mem_gb``, naming what would fit."""
    gpu_gb = getattr(cfg.cluster, "gpu_mem_gb", None)
    if gpu_gb is None or fits(plan, gpu_gb):
        return
    worst = max(plan.ranks, key=lambda r: r.peak_bytes)
    suggestions = []
    if plan.strategy == "videoinfinity":  # more ranks, shorter clips (when the clip length is derived)
        from .layout import videoinfinity_rank_counts

        candidates = [n for n in videoinfinity_rank_counts(cfg.num_latent_frames, cfg.strategy.clip_latent_frames)
                      if n > plan.num_ranks][:8]
    else:
        candidates = range(plan.num_ranks + 1, sum(r.layers[1] - r.layers[0] for r in plan.ranks) + 1)
    for ranks in candidates:
        if cfg.runtime.cfg_parallel and ranks % 2:  # two equal branch groups only
            continue
        if fits(make_plan(cfg, num_ranks=ranks), gpu_gb):
            per_node = cfg.cluster.gpus_per_node
            suggestions.append(f"{ranks} ranks (cluster.nodes={math.ceil(ranks / per_node)} x cluster.gpus_per_node="
                               f"{per_node} gives {math.ceil(ranks / per_node) * per_node}; with stage_layers null)")
            break
    if worst.peak_phase == "encode" and not worst.device_is_host:
        suggestions.append("model.text_encoder_device=cpu (the text encoder in host memory)")
    if not suggestions and cfg.model.dtype == "float32":
        suggestions.append("model.dtype=bfloat16")
    if plan.strategy == "videoinfinity":
        suggestions.append("a lower resolution (activations)")
    else:
        n = cfg.strategy.block_latent_frames
        suggestions.append(f"a smaller strategy.block_latent_frames than {n} or a lower resolution (activations and caches)")
    raise ConfigError([
        f"cluster.gpu_mem_gb={gpu_gb} is too small for this layout: rank {worst.rank} needs "
        f"{worst.peak_bytes / GIB:.2f} GiB + {CUDA_CONTEXT_GB} GiB CUDA context "
        f"({plan.num_ranks} ranks, model.dtype={cfg.model.dtype}); would fit: " + "; or ".join(suggestions)
    ])


def format_plan(plan: Plan, gpu_mem_gb: float | None = None) -> str:
    """The table ``hpcvideo plan`` prints (MiB with 2 decimals)."""
    def gib(x: float) -> str:  # MiB, so that tiny models show figures too
        return f"{x / 2**20:10.2f}"

    vi = plan.strategy == "videoinfinity"
    if vi:
        head = (f"{plan.model_id}: Video-Infinity, {plan.num_ranks} rank(s) = clips, {plan.num_ticks} steps, "
                f"{plan.tokens_per_block_forward} latent pixels per clip")
    else:
        head = (f"{plan.model_id}: {plan.num_ranks} rank(s), {plan.num_blocks} blocks, {plan.num_ticks} ticks, "
                f"{plan.blocks_in_flight} blocks in flight, {plan.tokens_per_block_forward} tokens per block forward")
    lines = [
        head,
        f"rank  {'clip   ' if vi else 'layers '}    weights       vae  text_enc activations     caches     queue      peak"
        "  (MiB)  sent MiB/tick  s/tick  peak in  host MiB",
    ]
    for r in plan.ranks:
        sec = f"{r.seconds_per_tick:7.3f}" if r.seconds_per_tick is not None else "      -"
        span = r.clip if vi else r.layers
        lines.append(
            f"{r.rank:4d}  {span[0]:3d}-{span[1]:<3d} {gib(r.weights_bytes)}{gib(r.vae_bytes)}{gib(r.text_encoder_bytes)}"
            f"{gib(r.activations_bytes)} {gib(r.caches_bytes)}{gib(r.queue_bytes)}{gib(r.peak_bytes)}"
            f"        {r.sent_bytes_per_tick / 2**20:9.2f} {sec}  {r.peak_phase:7s}{gib(r.host_peak_bytes)}"
        )
    if vi and plan.ranks:
        kinds = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in plan.ranks[0].sent_bytes_per_tick_by_kind.items())
        lines.append(f"rank 0 sends per step (MiB): {kinds}")
    if any(r.text_encoder_bytes for r in plan.ranks):
        where = "host (model.text_encoder_device=cpu)" if plan.text_encoder_device == "cpu" else "rank 0's device"
        lines.append(f"text encoder on {where}; phases: encode (text encoder alone, freed), load (weights + mapped "
                     "checkpoint pages), run")
    if plan.throughput_tflops:
        lines.append(f"time per tick at {plan.throughput_tflops:.3g} TFLOP/s per GPU: "
                     f"{max(r.seconds_per_tick or 0 for r in plan.ranks):.3f} s (slowest stage)")
    if gpu_mem_gb is not None:
        verdict = "fits" if fits(plan, gpu_mem_gb) else "does NOT fit"
        lines.append(f"{verdict} in cluster.gpu_mem_gb={gpu_mem_gb} (peak + {CUDA_CONTEXT_GB} GiB CUDA context per rank)")
    return "\n".join(lines)
