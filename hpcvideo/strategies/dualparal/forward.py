"""The Wan DiT forward split into stage-sized pieces: embed -> blocks[a:b] -> head.

The model file stays diffusers' ``WanTransformer3DModel``; this module only calls its submodules in
the order of ``WanTransformer3DModel.forward`` (diffusers 0.35-0.42, no image embeddings; one timestep
per sample, or one per token as Wan2.2 TI2V's ``expand_timesteps`` pipelines pass it), so ``head(run_blocks(embed(...)))`` gives the same bits as
``transformer(...)`` (tested). DualParal's layer split (arXiv 2505.21070, pipeline parallelism) runs
``embed`` on the first stage, a contiguous slice of ``transformer.blocks`` on each stage and ``head``
on the last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class BlockInputs:
    """What every transformer block of one forward needs besides the hidden states.

    Shapes (batch B = 1 per CFG branch, S = frames * (h/2) * (w/2) tokens, D = hidden dim):
    ``encoder_hidden_states`` (B, text_len, D); ``timestep_proj`` (B, 6, D) and ``temb`` (B, D), or
    with per-token timesteps (``expand_timesteps``) (B, S, 6, D) and (B, S, D);
    ``rotary_emb``: (cos, sin), each (1, S, 1, head_dim) float64/float32 as diffusers builds them;
    ``key_rotary_emb``: the same for the keys when the feature cache appends frames after the window
    (1, S + S_cache, 1, head_dim), else None; ``grid``: (frames, h/2, w/2) after patching.
    """

    encoder_hidden_states: torch.Tensor
    timestep_proj: torch.Tensor
    temb: torch.Tensor
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
    grid: tuple[int, int, int]


def block_inputs(
    transformer,
    latent_shape: tuple[int, int, int, int, int],
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    extra_key_frames: int = 0,
    image_embeds: torch.Tensor | None = None,
) -> BlockInputs:
    """Rotary tables and condition embeddings for a window of ``latent_shape`` (B, C, F, h, w).

    Needs no latents (rope only reads the shape), so every pipeline stage computes it itself from
    the tick plan: timestep (B,) or per token (B, S) (:func:`hpcvideo.conditioning.token_timesteps`), prompt_embeds
    (B, text_len, text_dim). ``extra_key_frames`` latent
    frames of keys appended after the window (feature cache) get rotary positions F .. F + extra - 1.
    ``image_embeds`` (B, tokens, image_dim): an image-to-video model's CLIP features, embedded and put
    before the text tokens (``encoder_hidden_states``) as diffusers does.
    """
    batch_size, num_channels, num_frames, height, width = latent_shape
    p_t, p_h, p_w = transformer.config.patch_size
    grid = (num_frames // p_t, height // p_h, width // p_w)
    dtype = transformer.patch_embedding.weight.dtype
    device = transformer.patch_embedding.weight.device
    # (1, 1, F, h, w) zero-stride probes: rope reads the shape only
    rotary_emb = transformer.rope(torch.zeros((), dtype=dtype, device=device).expand(1, 1, num_frames, height, width))
    key_rotary_emb = None
    if extra_key_frames:
        probe = torch.zeros((), dtype=dtype, device=device).expand(1, 1, num_frames + extra_key_frames, height, width)
        key_rotary_emb = transformer.rope(probe)
    per_token = timestep.ndim == 2  # as WanTransformer3DModel.forward: (B, S) -> flattened, seq_len S
    temb, timestep_proj, encoder_hidden_states, image_hidden_states = transformer.condition_embedder(
        timestep.flatten() if per_token else timestep, prompt_embeds, image_embeds,
        timestep_seq_len=timestep.shape[1] if per_token else None,
    )
    if image_hidden_states is not None:
        encoder_hidden_states = torch.concat([image_hidden_states, encoder_hidden_states], dim=1)
    timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))  # (B, S, 6, D) or (B, 6, D)
    return BlockInputs(
        encoder_hidden_states=encoder_hidden_states,
        timestep_proj=timestep_proj,
        temb=temb,
        rotary_emb=rotary_emb,
        key_rotary_emb=key_rotary_emb,
        grid=grid,
    )


class ConditionCache:
    """Memo of what :func:`block_inputs` computes from the prompt alone, the timestep alone and the
    window shape alone, so a stage does not redo the text projection (over all text tokens) for every
    (block, branch) item of every tick. Same modules, same inputs, so the same bits as recomputing
    (tested against diffusers' forward and WanPipeline). Per-token timesteps (B, S): ``step_key`` must
    identify the whole vector (e.g. the per-frame timesteps); only the last few are kept, each is
    (B, S, 6, D).

    Keys are supplied by the caller: ``prompt_key`` identifies the prompt embeddings (e.g. the
    prompt's index, "negative"), ``step_key`` the timestep (the step index). Memory: one
    (1, text_len, D) tensor per distinct prompt, one (1, 6, D) per step, one rotary table per shape.
    """

    def __init__(self, transformer) -> None:
        self.transformer = transformer
        self._text: dict = {}
        self._time: dict = {}
        self._rope: dict = {}
        self._token_time: dict = {}  # per-token timesteps: the last few only (each is (B, S, 6, D))

    def _rotary(self, num_frames: int, height: int, width: int):
        key = (num_frames, height, width)
        if key not in self._rope:
            weight = self.transformer.patch_embedding.weight
            probe = torch.zeros((), dtype=weight.dtype, device=weight.device).expand(1, 1, num_frames, height, width)
            self._rope[key] = self.transformer.rope(probe)
        return self._rope[key]

    def block_inputs(self, latent_shape, timestep, prompt_embeds, *, prompt_key, step_key, extra_key_frames: int = 0,
                     image_embeds: torch.Tensor | None = None) -> BlockInputs:
        """As :func:`block_inputs`, memoised (``image_embeds``: the same for every call of a run). Mirrors
        ``WanTimeTextImageEmbedding.forward``."""
        batch_size, num_channels, num_frames, height, width = latent_shape
        p_t, p_h, p_w = self.transformer.config.patch_size
        embedder = self.transformer.condition_embedder
        time_key = (step_key, prompt_embeds.dtype)
        if timestep.ndim == 2:  # per-token (expand_timesteps): WanTransformer3DModel.forward's path
            if time_key not in self._token_time:
                if len(self._token_time) >= 4:
                    del self._token_time[next(iter(self._token_time))]
                projected = embedder.timesteps_proj(timestep.flatten()).unflatten(0, (-1, timestep.shape[1]))
                time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
                if projected.dtype != time_dtype and time_dtype != torch.int8:
                    projected = projected.to(time_dtype)
                temb = embedder.time_embedder(projected).type_as(prompt_embeds)  # (B, S, D)
                self._token_time[time_key] = (temb, embedder.time_proj(embedder.act_fn(temb)).unflatten(2, (6, -1)))
            temb, timestep_proj = self._token_time[time_key]
        elif time_key not in self._time:
            projected = embedder.timesteps_proj(timestep)
            time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
            if projected.dtype != time_dtype and time_dtype != torch.int8:
                projected = projected.to(time_dtype)
            temb = embedder.time_embedder(projected).type_as(prompt_embeds)
            timestep_proj = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6, D)
            self._time[time_key] = (temb, timestep_proj)
        if prompt_key not in self._text:
            self._text[prompt_key] = embedder.text_embedder(prompt_embeds)
            if image_embeds is not None:  # image-to-video: image tokens before the text tokens
                image_hidden_states = embedder.image_embedder(image_embeds)
                self._text[prompt_key] = torch.concat([image_hidden_states, self._text[prompt_key]], dim=1)
        if timestep.ndim != 2:
            temb, timestep_proj = self._time[time_key]
        return BlockInputs(
            encoder_hidden_states=self._text[prompt_key],
            timestep_proj=timestep_proj,
            temb=temb,
            rotary_emb=self._rotary(num_frames, height, width),
            key_rotary_emb=self._rotary(num_frames + extra_key_frames, height, width) if extra_key_frames else None,
            grid=(num_frames // p_t, height // p_h, width // p_w),
        )


def patchify(transformer, latents: torch.Tensor) -> torch.Tensor:
    """Patch embedding: latents (B, C, F, h, w) -> hidden_states (B, S, D), S = F * h/2 * w/2."""
    hidden_states = transformer.patch_embedding(latents)
    return hidden_states.flatten(2).transpose(1, 2).contiguous()


def embed(
    transformer,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    extra_key_frames: int = 0,
    image_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockInputs]:
    """First-stage work: :func:`patchify` + :func:`block_inputs`. latents: (B, C, F, h, w) in the
    transformer's dtype. Returns hidden_states (B, S, D) and the :class:`BlockInputs`."""
    inputs = block_inputs(transformer, tuple(latents.shape), timestep, prompt_embeds, extra_key_frames=extra_key_frames,
                          image_embeds=image_embeds)
    return patchify(transformer, latents), inputs


def run_blocks(transformer, hidden_states: torch.Tensor, inputs: BlockInputs, layer_indices=None) -> torch.Tensor:
    """Transformer blocks ``layer_indices`` (default: all present) on (B, S, D) hidden states."""
    blocks = transformer.blocks
    indices = range(len(blocks)) if layer_indices is None else layer_indices
    for index in indices:
        hidden_states = blocks[index](hidden_states, inputs.encoder_hidden_states, inputs.timestep_proj, inputs.rotary_emb)
    return hidden_states


def head(transformer, hidden_states: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """Output norm, projection and unpatchify: (B, S, D) -> noise_pred (B, C_out, F, h, w)."""
    batch_size = hidden_states.shape[0]
    p_t, p_h, p_w = transformer.config.patch_size
    frames, rows, cols = inputs.grid
    if inputs.temb.ndim == 3:  # per-token timesteps (B, S, D), as WanTransformer3DModel.forward
        table = transformer.scale_shift_table.unsqueeze(0).to(inputs.temb.device)
        shift, scale = (table + inputs.temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (transformer.scale_shift_table.to(inputs.temb.device) + inputs.temb.unsqueeze(1)).chunk(2, dim=1)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)
    hidden_states = (transformer.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    hidden_states = transformer.proj_out(hidden_states)
    # (B, S, p_t*p_h*p_w*C) -> (B, F, h', w', p_t, p_h, p_w, C) -> (B, C, F*p_t, h'*p_h, w'*p_w)
    hidden_states = hidden_states.reshape(batch_size, frames, rows, cols, p_t, p_h, p_w, -1)
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def forward(transformer, latents, timestep, prompt_embeds, *, extra_key_frames: int = 0,
            image_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The whole model: (B, C, F, h, w) -> noise_pred (B, C_out, F, h, w); equals ``transformer(...)``."""
    hidden_states, inputs = embed(transformer, latents, timestep, prompt_embeds, extra_key_frames=extra_key_frames,
                                  image_embeds=image_embeds)
    hidden_states = run_blocks(transformer, hidden_states, inputs)
    return head(transformer, hidden_states, inputs)
