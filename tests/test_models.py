"""hpcvideo.models: the tiny Wan model, loading, model facts, prompt encoding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpcvideo.models import (
    TINY_VERSION,
    build_tiny_wan,
    encode_prompts,
    ensure_tiny_wan,
    load_wan,
    read_model_info,
)
from hpcvideo.models.tiny import COMPLETE_MARKER


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return build_tiny_wan(tmp_path_factory.mktemp("tiny") / "tiny-wan", seed=0)


@pytest.fixture(scope="module")
def components(tiny_path):
    return load_wan(tiny_path)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        for name, t in load_file(file).items():
            out[f"{file.relative_to(folder)}:{name}"] = t
    return out


def test_build_is_deterministic(tiny_path, tmp_path):
    again = build_tiny_wan(tmp_path / "again", seed=0)
    a, b = _tensors(tiny_path), _tensors(again)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for rel in ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"):
        assert (tiny_path / rel).read_text() == (again / rel).read_text(), rel


def test_build_other_seed_differs(tiny_path, tmp_path):
    other = _tensors(build_tiny_wan(tmp_path / "seed1", seed=1))
    base = _tensors(tiny_path)
    assert any(not torch.equal(base[k], other[k]) for k in base)


def test_load_wan(components, tiny_path):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    c = components
    assert isinstance(c.transformer, WanTransformer3DModel)
    assert isinstance(c.vae, AutoencoderKLWan)
    assert isinstance(c.text_encoder, UMT5EncoderModel)
    assert c.tokenizer is not None and c.tokenizer.pad_token_id == 0
    assert c.scheduler_config["_class_name"] == "UniPCMultistepScheduler"
    assert c.scheduler_config["prediction_type"] == "flow_prediction"
    assert c.scheduler_config["use_flow_sigmas"] is True
    assert c.scheduler_config["flow_shift"] == 3.0
    assert type(c.scheduler_config) is dict
    assert c.model_id == tiny_path.name and c.path == tiny_path
    assert not c.transformer.training and not c.text_encoder.training


def test_load_wan_dtype_and_parts(tiny_path):
    c = load_wan(tiny_path, dtype=torch.bfloat16, parts=("transformer", "vae"))
    assert c.transformer.dtype == torch.bfloat16
    assert c.vae.dtype == torch.float32  # the VAE stays float32
    assert c.text_encoder is None and c.tokenizer is None
    assert c.scheduler_config["num_train_timesteps"] == 1000
    with pytest.raises(ValueError, match="unknown parts"):
        load_wan(tiny_path, parts=("unet",))


def test_read_model_info_matches_configs(components, tiny_path):
    info = read_model_info(tiny_path)
    tc, vc = components.transformer.config, components.vae.config
    assert info["latent_channels"] == vc.z_dim == tc.in_channels == tc.out_channels == 4
    assert info["vae_scale_factor_spatial"] == vc.scale_factor_spatial == 8
    assert info["vae_scale_factor_temporal"] == vc.scale_factor_temporal == 4
    assert info["patch_size"] == tuple(tc.patch_size) == (1, 2, 2)
    assert info["num_layers"] == tc.num_layers == len(components.transformer.blocks) == 4
    assert info["num_attention_heads"] == tc.num_attention_heads == 2
    assert info["hidden_dim"] == tc.num_attention_heads * tc.attention_head_dim == 24
    assert info["text_dim"] == tc.text_dim == components.text_encoder.config.d_model == 32
    assert info["rope_max_seq_len"] == tc.rope_max_seq_len == 1024
    assert info["model_id"] == components.model_id


def test_model_id_from_hub_cache_layout(tiny_path, tmp_path):
    snap = tmp_path / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" / "snapshots" / "0123abc"
    shutil.copytree(tiny_path, snap)
    assert read_model_info(snap)["model_id"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


def test_encode_prompts_equals_wan_pipeline(components, tiny_path):
    from diffusers import WanPipeline

    prompts = ["A cat walking on the beach at sunset, cinematic.", "a red car", ""]
    negative = "worst quality, blurry"
    embeds, neg = encode_prompts(
        components, prompts, negative_prompt=negative, max_sequence_length=24, device="cpu", dtype=torch.float32
    )
    assert len(embeds) == 3 and all(e.shape == (1, 24, 32) for e in embeds)
    assert neg.shape == (1, 24, 32)
    pipe = WanPipeline.from_pretrained(tiny_path, local_files_only=True)
    for prompt, got in zip(prompts, embeds):
        with torch.no_grad():  # as inside WanPipeline.__call__
            want, want_neg = pipe.encode_prompt(prompt, negative, max_sequence_length=24, device="cpu")
        assert torch.equal(got, want)
        assert torch.equal(neg, want_neg)
    _, none = encode_prompts(components, prompts[:1], negative_prompt=None, max_sequence_length=24,
                             device="cpu", dtype=torch.float32)
    assert none is None
    # padding positions are zero, as in WanPipeline
    assert torch.count_nonzero(embeds[1][0, 5:]) == 0


def test_wan_pipeline_runs_offline(tiny_path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a dog running in a park",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape == (1, 5, 32, 32, 3)


def test_not_a_wan_folder(tiny_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(FileNotFoundError, match=r"broken.*'transformer' is missing"):
        load_wan(broken)
    with pytest.raises(FileNotFoundError, match="transformer"):
        read_model_info(broken)
    load_wan(broken, parts=("vae", "scheduler"))  # a rank that needs no transformer still loads
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wan(tmp_path / "nowhere")


def test_read_model_info_rejects_channel_mismatch(tiny_path, tmp_path):
    bad = tmp_path / "i2v"
    shutil.copytree(tiny_path, bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    cfg["in_channels"] = 36
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="text-to-video"):
        read_model_info(bad)


@pytest.mark.e2e  # two real processes build the model at once
def test_ensure_tiny_wan_concurrent(tmp_path):
    cache = tmp_path / "cache"
    code = textwrap.dedent(
        """
        from hpcvideo.check import cache_folder
        from hpcvideo.models import ensure_tiny_wan
        print(ensure_tiny_wan(cache_folder()))  # $HPCVIDEO_CACHE, read at the edge
        """
    )
    env = dict(os.environ, HPCVIDEO_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    final = cache / f"tiny-wan-{TINY_VERSION}-seed0"
    assert {out.strip() for out, _ in results} == {str(final)}
    assert sorted(x.name for x in cache.iterdir()) == [final.name]  # no temporary folders left behind
    assert (final / COMPLETE_MARKER).is_file()
    assert (final / "model_index.json").is_file()
    # a later call finds it and does not rebuild
    mtime = (final / COMPLETE_MARKER).stat().st_mtime_ns
    assert ensure_tiny_wan(cache) == final
    assert (final / COMPLETE_MARKER).stat().st_mtime_ns == mtime
    load_wan(final, parts=("vae", "scheduler"))
