"""A tiny, random-weight Wan2.1 text-to-video model in diffusers format, built offline for CPU tests.

The folder is a complete Wan diffusers checkpoint (``model_index.json``, ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), so the same loading code serves it and a real
``Wan-AI/Wan2.1-T2V-*-Diffusers`` folder, and ``WanPipeline.from_pretrained(folder)`` works offline.

Sizes (``TINY_VERSION = "v2"``; change the version whenever a number below changes):

* transformer: patch (1, 2, 2), 4 layers (so tests can split it into 1..4 stages), 2 heads x head dim 12 (hidden 24; rope splits t/h/w = 4/4/4),
  in/out channels 4, text_dim 32, freq_dim 32, ffn_dim 64, rope_max_seq_len 1024.
* VAE: Wan2.1 layout (dim_mult [1, 2, 4, 4], temperal_downsample [False, True, True], so 8x spatial
  and 4x temporal compression), base_dim 4, num_res_blocks 0, z_dim 4; made small so that decoding
  is fast on CPU (about 0.12 s per latent frame of 16x16 on 2 cores).
* text encoder: UMT5 with d_model 32, 2 layers, 2 heads, d_kv 16, d_ff 64.
* tokenizer: word-level over a fixed built-in English vocabulary (lower-cased), ``[PAD]``=0,
  ``</s>``=1 (appended to every prompt, as T5 does), ``[UNK]``=2.
* scheduler: UniPCMultistepScheduler as in Wan2.1-Diffusers (flow_prediction, flow sigmas, shift 3).

Weights are random but bit-identical on every build (``torch.manual_seed(seed)`` before each module).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

TINY_VERSION = "v2"
COMPLETE_MARKER = ".hpcvideo-complete"

# Latent channels of the tiny VAE == transformer in/out channels.
TINY_Z_DIM = 4

# A small fixed corpus: common words of video prompts plus filler English. Sorted and de-duplicated
# at build time, so its order here does not matter.
_CORPUS = """
a an the of and or in on at to from with without by for over under into onto through across along
around behind between above below near far inside outside up down left right while as is are was be
it its this that these those there here very slowly quickly gently softly suddenly
cat dog bird fish horse cow sheep lion tiger bear wolf fox rabbit deer elephant monkey panda whale
dolphin shark eagle owl butterfly bee dragon robot man woman child boy girl person people crowd
astronaut pilot chef dancer runner surfer skier musician soldier knight king queen family friends
car truck bus train plane boat ship bicycle motorcycle rocket spaceship drone balloon
city street road bridge tunnel building house tower castle village town market station airport
forest jungle desert beach ocean sea lake river waterfall mountain hill valley field meadow garden
park island cave volcano glacier snow ice rain storm cloud clouds sky sun moon star stars planet
space galaxy night day morning evening sunset sunrise dawn dusk light shadow fire smoke water wave
waves wind grass tree trees flower flowers leaves rock sand stone road path sidewalk window door
room kitchen table chair bed lamp screen computer phone book camera mirror painting
red orange yellow green blue purple pink white black gray grey brown golden silver colorful dark
bright warm cold soft sharp blurry clear misty foggy sunny rainy snowy cloudy calm quiet loud
big small tiny huge tall short long wide old young new ancient modern futuristic beautiful
walking running jumping flying swimming dancing singing playing eating drinking sleeping sitting
standing riding driving falling rising floating spinning turning moving looking smiling laughing
crying talking reading writing cooking painting fighting climbing surfing skiing skating sailing
exploring chasing holding carrying throwing catching opening closing burning melting growing
shining glowing flowing blowing crashing breaking exploding rolling sliding
camera shot close-up closeup wide-angle aerial view drone tracking panning zoom zooming pan tilt
slow motion timelapse time-lapse cinematic realistic photorealistic animation animated cartoon
style film movie scene video footage frame frames lighting detailed high quality resolution 4k 8k
hd sharp focus depth background foreground portrait landscape vintage retro neon cyberpunk fantasy
epic dramatic peaceful serene lively busy empty crowded
worst low blurry distorted deformed ugly static still overexposed underexposed jpeg artifacts
subtitles watermark text noisy messy poorly drawn extra fingers hands faces frozen
one two three four five many several some every all each other another more most less
his her their our my your he she they we you i them him
has have had do does did can could will would should may might must
, . ! ? ' " : ; ( ) -
""".split()

_SPECIAL_TOKENS = ("[PAD]", "</s>", "[UNK]")  # ids 0, 1, 2 as in UMT5 (pad 0, eos 1)


def _build_tokenizer():
    """Word-level fast tokenizer over the built-in corpus; deterministic (vocabulary sorted)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(w.lower() for w in _CORPUS))
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    for w in words:
        # The pre-tokenizer splits "close-up" into "close", "-", "up": register the pieces.
        for piece in pre_tokenizers.Whitespace().pre_tokenize_str(w):
            vocab.setdefault(piece[0], len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        eos_token="</s>",
        unk_token="[UNK]",
        model_max_length=512,
        padding_side="right",
    )


def build_tiny_wan(path, *, seed: int = 0) -> Path:
    """Build the tiny Wan2.1 T2V model and save it as a diffusers folder at ``path``.

    Deterministic: the same ``seed`` gives the same tensors on every call (CPU, float32).
    Returns the folder's path. Existing files in ``path`` are overwritten.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rope: h = w = 2 * (12 // 6) = 4, t = 4 (all even)
        in_channels=TINY_Z_DIM,
        out_channels=TINY_Z_DIM,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=4,  # 4 so that tests can split it into 1..4 pipeline stages
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=TINY_Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=0,
        attn_scales=[],
        temperal_downsample=[False, True, True],  # 2**3 = 8x spatial, 2**2 = 4x temporal
        latents_mean=[round(0.25 * (i - TINY_Z_DIM / 2), 4) for i in range(TINY_Z_DIM)],
        latents_std=[round(1.0 + 0.5 * i, 4) for i in range(TINY_Z_DIM)],
    )

    torch.manual_seed(seed)
    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder = UMT5EncoderModel(text_config)

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=3.0,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.save_pretrained(path)
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def ensure_tiny_wan(cache_dir: str | Path) -> Path:
    """Return the cached tiny model folder ``<cache_dir>/tiny-wan-{TINY_VERSION}-seed0``, building it once.

    ``cache_dir``: the model cache, resolved by the caller (:func:`hpcvideo.check.cache_folder`: ``$HPCVIDEO_CACHE``
    or ``~/.cache/hpcvideo``); created if missing. Safe when many processes
    (MPI ranks) call it at once: each builds into a private temporary sibling folder, writes the
    completion marker last and renames the folder into place; a loser of the race discards its copy.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tiny-wan-{TINY_VERSION}-seed0"
    if _is_complete(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the installed model is readable like any cache
        build_tiny_wan(tmp, seed=0)
        (tmp / COMPLETE_MARKER).write_text(f"tiny-wan {TINY_VERSION} seed 0\n")
        for _ in range(10):
            try:
                os.rename(tmp, final)  # atomic; fails if `final` is a non-empty directory
                return final
            except OSError:
                if _is_complete(final):
                    return final  # another process won the race; ours is discarded below
                if final.exists():
                    # A stale, incomplete folder (not made by this function): move it aside, then retry.
                    stale = cache_dir / f".{final.name}.stale-{uuid.uuid4().hex}"
                    try:
                        os.rename(final, stale)
                    except OSError:
                        pass  # someone else moved or replaced it
                    shutil.rmtree(stale, ignore_errors=True)
        raise RuntimeError(f"could not install the tiny Wan model into {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
