"""DualParal's spec for the runner: its model-fit checks (no weights), its store layout (a unit is a block of
``strategy.block_latent_frames``; a run can be extended) and its builder (this rank's pipeline stage,
and its sink: :func:`hpcvideo.parallel_decode.make_sink`, the decode spread over every rank for a chunk-local
VAE, else rank 0's streaming decoder behind a background :class:`hpcvideo.writer.BlockSink`).

Queue state lives on rank 0 only (:class:`.pipeline.DualParalPipeline`): rank 0 checkpoints and writes; the
other stages are stateless between ticks (with a spread decode they decode their share of the blocks).
"""

from __future__ import annotations

from ...conditioning import frame_condition, image_to_video_inputs
from ...continuation import init_context
from ...noise import block_noise
from ..base import BuildContext, StrategySpec
from .config_rules import model_problems
from .pipeline import DualParalPipeline, split_layers


class DualParalSpec(StrategySpec):
    name, title = "dualparal", "DualParal"
    every_rank_writes = False
    extendable = True

    def unit_latent_frames(self, cfg) -> int:
        return cfg.strategy.block_latent_frames

    def problems(self, cfg, family, info, world_size):
        """The config rules' model checks (:func:`.config_rules.model_problems`: strides, rotary table, stage split)."""
        return model_problems(cfg, info, world_size)

    def plan(self, cfg, info, world_size):
        """The stage split: one layer range per rank (with ``runtime.cfg_parallel`` each half of the ranks
        splits the blocks the same way)."""
        if cfg.runtime.cfg_parallel:
            return 2 * split_layers(info["num_layers"], world_size // 2, cfg.runtime.stage_layers)
        return split_layers(info["num_layers"], world_size, cfg.runtime.stage_layers)

    def build(self, ctx: BuildContext):
        cfg, env, info = ctx.cfg, ctx.env, ctx.info
        strategy, sampling = cfg.strategy, cfg.sampling
        layers = ctx.plan[env.rank]
        experts = ctx.family.experts(info)  # Wan2.2 A14B: this stage holds its layers of both experts
        stages = [ctx.family.load_stage(ctx.model_path, layers, device=env.device, dtype=ctx.dtype, expert=name)
                  for name in experts.names]
        scale = info["vae_scale_factor_spatial"]
        latent_shape = (info["latent_channels"], cfg.video.height // scale, cfg.video.width // scale)

        def noise_fn(block_index: int):
            return block_noise(
                seed=sampling.seed, block_index=block_index, block_latent_frames=strategy.block_latent_frames,
                context_latent_frames=strategy.context_latent_frames, mode=strategy.noise_init,
                latent_channels=latent_shape[0], latent_height=latent_shape[1], latent_width=latent_shape[2],
            )

        components = ctx.family.load(ctx.model_path, device=env.device, dtype=ctx.dtype, vae=True)  # every rank may decode
        channels, image_embeds = image_to_video_inputs(cfg, info, ctx.model_path, components.vae, env)
        template = ctx.family.make_scheduler(cfg, components.scheduler_config, env.device)
        pipeline = DualParalPipeline
        if cfg.runtime.cfg_parallel:  # the cond and uncond branches on two halves of the ranks
            from .cfg_pipeline import CfgParallelPipeline as pipeline
        executor = pipeline(
            env=env, layers=layers, latent_shape=latent_shape,
            transformer=stages[0], transformer_2=stages[1] if len(stages) > 1 else None, experts=experts,
            guidance_scale_2=sampling.guidance_scale_2, scheduler_template=template, prompt_embeds=ctx.prompt_embeds,
            negative_prompt_embeds=ctx.negative_prompt_embeds, prompt_index_for_block=cfg.prompt_index_for_block,
            guidance_scale=sampling.guidance_scale, num_blocks=cfg.num_blocks,
            block_latent_frames=strategy.block_latent_frames, context_latent_frames=strategy.context_latent_frames,
            feature_cache=strategy.feature_cache, noise_fn=noise_fn,
            expand_timesteps=info.get("expand_timesteps", False),
            condition=frame_condition(cfg, info, components.vae if env.is_main else None, env.device),
            condition_channels=channels, image_embeds=None if image_embeds is None else image_embeds.to(ctx.dtype),
            initial_context=cfg.condition.init_video is not None or cfg.condition.init_store is not None,
            init_context=init_context(cfg, info, components.vae if env.is_main else None, template, env.device),
        )
        ctx.run_attrs["stage_layers"] = [len(r) for r in ctx.plan]
        from ...parallel_decode import make_sink

        sink = make_sink(ctx, components.vae)  # decode spread over the ranks when the VAE allows it
        return executor, sink
