"""Configs of the demo model: a small Wan2.1 text-to-video model in diffusers format.

Same classes and folder layout as ``Wan-AI/Wan2.1-T2V-*-Diffusers`` (so :func:`hpcvideo.models.load_wan`
and ``WanPipeline.from_pretrained`` load it), sized to train on one CPU thread in well under an hour:

* VAE (AutoencoderKLWan): Wan2.1 layout, 8x spatial and 4x temporal compression (dim_mult [1, 2, 4, 4],
  temperal_downsample [False, True, True]), base_dim 12, one residual block per level, z_dim 16.
  64 x 64 x 21 pixel frames -> 16 x 6 x 8 x 8 latents.
* transformer (WanTransformer3DModel): patch (1, 2, 2) -> 4 x 4 tokens per latent frame at 64 x 64;
  4 layers (so it can be split into 1..4 DualParal stages), 4 heads x head dim 16 (hidden 64), ffn 192,
  text_dim 32, freq_dim 64.
* text encoder: UMT5 (d_model 32, 2 layers), random init and frozen: a fixed, deterministic map from
  caption words to embeddings, which the transformer learns to read through cross-attention.
* tokenizer: word-level over the captions' vocabulary (:data:`hpcvideo.demo.data.VOCABULARY`),
  ``[PAD]``=0, ``</s>``=1 (appended, as T5 does), ``[UNK]``=2.
* scheduler: UniPCMultistepScheduler as in Wan2.1-Diffusers (flow_prediction, flow sigmas, shift 3).

Native window (the clip length the transformer is trained on): 21 pixel frames = 6 latent frames,
64 x 64 pixels; DualParal's block + context should not exceed it (e.g. block 4 + context 2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import WEIGHTS_DIR  # noqa: F401 - the shipped diffusers folder (re-exported)
from .data import VOCABULARY

HEIGHT = 64  # pixels of the training clips
WIDTH = 64
NUM_FRAMES = 21  # pixel frames per training clip = the native window (6 latent frames)
Z_DIM = 16  # latent channels (as Wan2.1)
TEXT_DIM = 32
MAX_SEQUENCE_LENGTH = 16  # text tokens per caption (the longest caption has 12 words + </s>)


def build_tokenizer():
    """Word-level fast tokenizer over the captions' vocabulary; deterministic (sorted)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(("[PAD]", "</s>", "[UNK]"))}
    for word in VOCABULARY:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]",
                                   model_max_length=512, padding_side="right")


def build_vae(*, seed: int = 0):
    """The demo AutoencoderKLWan at random init (``latents_mean``/``latents_std`` set after training)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=12, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
    )


def build_transformer(*, seed: int = 0):
    """The demo WanTransformer3DModel at random init."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,  # rope t/h/w = 8/4/4
        in_channels=Z_DIM, out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=192, num_layers=4,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    )


def build_text_encoder(vocab_size: int, *, seed: int = 0):
    """The demo UMT5EncoderModel (random init; kept frozen)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def build_scheduler():
    """Wan2.1's inference scheduler (UniPC, flow prediction, flow sigmas, shift 3)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=1000, flow_shift=3.0)


def save_folder(path, *, tokenizer, text_encoder, vae, transformer) -> Path:
    """Save the parts as a Wan diffusers folder (``WanPipeline.save_pretrained``: safetensors)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=build_scheduler(),
                       transformer=transformer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
