"""hpcvideo.config: loading, overrides, every validation rule, derived values, diffs."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import yaml

from hpcvideo.config import (
    IDENTITY_IGNORED,
    MISSING,
    ConfigError,
    PromptEntry,
    RunConfig,
    config_diff,
    format_diff,
    identity_dict,
    list_presets,
    load_config,
    validate_config,
)

BASE = {"sampling": {"prompt": "a cat"}}


def with_(**sections):
    """BASE merged with the given sections (one level deep)."""
    d = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def errors_of(source, *overrides, **kwargs) -> list[str]:
    kwargs.setdefault("check_paths", False)
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides, **kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value).count("\n") == len(info.value.errors)  # header + one line per error
    return info.value.errors


def one_error(source, *overrides, **kwargs) -> str:
    errors = errors_of(source, *overrides, **kwargs)
    assert len(errors) == 1, errors
    return errors[0]


# ------------------------------------------------------------------------------------ defaults


def test_defaults():
    cfg = load_config(BASE, check_paths=False)
    assert cfg.model.family == "wan" and cfg.model.path == "tiny" and cfg.model.dtype == "bfloat16"
    assert (cfg.video.num_frames, cfg.video.height, cfg.video.width, cfg.video.fps) == (93, 480, 832, 16.0)
    assert cfg.sampling.seed == 0 and cfg.sampling.num_inference_steps == 50
    assert cfg.sampling.guidance_scale == 5.0 and cfg.sampling.scheduler == "unipc"
    assert cfg.sampling.flow_shift == 3.0 and cfg.sampling.max_sequence_length == 512
    assert cfg.sampling.negative_prompt
    assert cfg.sampling.prompts == [PromptEntry(from_frame=0, prompt="a cat")]
    assert cfg.strategy.name == "dualparal" and cfg.strategy.block_latent_frames == 8
    assert cfg.strategy.context_latent_frames == 2 and cfg.strategy.feature_cache is True
    assert cfg.strategy.noise_init == "coordinated"
    assert cfg.store.path is None and cfg.store.checkpoint_every_ticks == 4 and cfg.store.checkpoint_every_s == 300.0
    assert cfg.runtime.device == "auto" and cfg.runtime.num_threads == 0
    c = cfg.cluster
    assert (c.nodes, c.gpus_per_node, c.cpus_per_task, c.mem_gb, c.timeout_min) == (1, 1, 8, 64, 240)
    assert c.partition is None and c.account is None
    # the defaults fit together: 93 frames -> 24 latent frames = 3 blocks of 8
    assert cfg.num_latent_frames == 24 and cfg.num_blocks == 3


def test_empty_sections_take_defaults():
    cfg = load_config({"video": None, "sampling": {"prompt": "x"}, "store": {}}, check_paths=False)
    assert cfg.video.num_frames == 93


# ------------------------------------------------------------------------------ derived values


def test_derived_values_tiny_test():
    cfg = load_config("tiny-test", check_paths=False)
    assert cfg.num_latent_frames == 8  # (29 - 1) // 4 + 1
    assert cfg.num_blocks == 4  # 8 // 2
    assert [cfg.block_first_frame(j) for j in range(4)] == [0, 5, 13, 21]  # 4*(2j-1)+1
    # prompts from frames 0 and 9: block 1 starts at 5 (< 9), block 2 at 13 (>= 9)
    assert [cfg.prompt_index_for_block(j) for j in range(4)] == [0, 0, 1, 1]


def test_derived_values_hand_computed():
    prompts = [{"from_frame": 0, "prompt": "a"}, {"from_frame": 29, "prompt": "b"}, {"from_frame": 30, "prompt": "c"}]
    with pytest.warns(UserWarning, match=r"sampling.prompts\[1\] \(from_frame=29\) is used by no block"):
        cfg = load_config(
            {"video": {"num_frames": 97}, "strategy": {"block_latent_frames": 5}, "sampling": {"prompts": prompts}},
            check_paths=False,
        )
    assert cfg.num_latent_frames == 25 and cfg.num_blocks == 5
    # n = 5: block j starts at 4*(5j-1)+1 = 20j - 3
    assert [cfg.block_first_frame(j) for j in range(5)] == [0, 17, 37, 57, 77]
    # 29 <= 37 and 30 <= 37: block 2 takes the last one that started (index 2)
    assert [cfg.prompt_index_for_block(j) for j in range(5)] == [0, 0, 2, 2, 2]
    # exactly at a block start
    cfg2 = load_config({**cfg.to_dict(), "sampling": {**cfg.to_dict()["sampling"], "prompts": [
        {"from_frame": 0, "prompt": "a"}, {"from_frame": 17, "prompt": "b"}]}}, check_paths=False)
    assert [cfg2.prompt_index_for_block(j) for j in range(5)] == [0, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        cfg.block_first_frame(-1)


def test_num_latent_frames_formula():
    for num_latent in (1, 2, 3, 8, 126):
        num_frames = 4 * (num_latent - 1) + 1
        cfg = load_config(with_(video={"num_frames": num_frames}, strategy={"block_latent_frames": 1,
                                                                              "context_latent_frames": 0}),
                          check_paths=False)
        assert cfg.num_latent_frames == num_latent and cfg.num_blocks == num_latent


# ----------------------------------------------------------------------------------- presets


def test_presets_listed():
    assert {"tiny-test", "tiny-cpu", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"} <= set(list_presets())


@pytest.mark.parametrize("name", ["tiny-test", "tiny-cpu"])
def test_tiny_presets_load_with_paths(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unused prompts either
        cfg = load_config(name, output=tmp_path / "run.zarr")
    assert cfg.model.path == "tiny" and cfg.model.dtype == "float32"
    assert cfg.store.path == str(tmp_path / "run.zarr")
    assert not (tmp_path / "run.zarr").exists()  # validation creates nothing


def test_tiny_cpu_numbers():
    cfg = load_config("tiny-cpu", check_paths=False)
    assert (cfg.num_latent_frames, cfg.num_blocks, cfg.strategy.block_latent_frames) == (126, 18, 7)
    assert cfg.strategy.context_latent_frames == 2 and cfg.sampling.num_inference_steps == 8
    assert len(cfg.sampling.prompts) == 3 and cfg.store.path == "runs/tiny-cpu.zarr"
    assert (cfg.store.checkpoint_every_ticks, cfg.store.checkpoint_every_s) == (4, 60.0)


@pytest.mark.parametrize("name, gpus", [("wan2.1-t2v-1.3b", 4), ("wan2.1-t2v-14b", 8), ("wan2.2-ti2v-5b", 4)])
def test_real_model_presets(name, gpus):
    cfg = load_config(name, check_paths=False)
    assert cfg.model.dtype == "bfloat16" and cfg.strategy.block_latent_frames == 8
    assert cfg.num_latent_frames % 8 == 0 and cfg.cluster.gpus_per_node == gpus
    # the placeholder model path is refused when paths are checked
    errors = errors_of(name, output="runs/x.zarr", check_paths=True)
    assert len(errors) == 1 and "model.path=" in errors[0] and "model_index.json" in errors[0]


def test_preset_path_and_yaml_file_are_the_same(tmp_path):
    from hpcvideo.config import PRESETS_DIR

    a = load_config("tiny-test", check_paths=False)
    b = load_config(PRESETS_DIR / "tiny-test.yaml", check_paths=False)
    c = load_config(str(PRESETS_DIR / "tiny-test.yaml"), check_paths=False)
    assert a == b == c


def test_unknown_source():
    msg = one_error("no-such-preset")
    assert "'no-such-preset'" in msg and "tiny-cpu" in msg


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("video: [1, 2\n")
    assert "bad.yaml" in one_error(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "list" in one_error(listy) and "mapping" in one_error(listy)


# --------------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml(tmp_path):
    cfg = load_config(
        "tiny-test",
        [
            "sampling.guidance_scale=3",
            "sampling.prompts=[{from_frame: 0, prompt: a cat}, {from_frame: 13, prompt: a dog}]",
            "strategy.feature_cache=false",
            "model.dtype=bfloat16",
            "cluster.partition=gpu",
        ],
        check_paths=False,
    )
    assert cfg.sampling.guidance_scale == 3.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert cfg.sampling.prompts == [PromptEntry(from_frame=0, prompt="a cat"), PromptEntry(from_frame=13, prompt="a dog")]
    assert cfg.strategy.feature_cache is False and cfg.model.dtype == "bfloat16" and cfg.cluster.partition == "gpu"


def test_string_override_keeps_raw_text():
    # YAML would read these as a mapping / a number; a str field keeps the text as typed
    cfg = load_config(BASE, ["sampling.prompt=Night: a cat on a roof", "sampling.negative_prompt=123"], check_paths=False)
    assert cfg.sampling.prompts[0].prompt == "Night: a cat on a roof"
    assert cfg.sampling.negative_prompt == "123"
    cfg = load_config(BASE, ["store.path=runs/a.zarr"], check_paths=False)
    assert cfg.store.path == "runs/a.zarr"
    cfg = load_config(with_(store={"path": "x"}), ["store.path=null"], check_paths=False)
    assert cfg.store.path is None


def test_prompt_override_replaces_schedule():
    cfg = load_config("tiny-test", ["sampling.prompt=just one"], check_paths=False)
    assert cfg.sampling.prompts == [PromptEntry(from_frame=0, prompt="just one")]
    cfg = load_config(BASE, ["sampling.prompts=[{from_frame: 0, prompt: b}]"], check_paths=False)
    assert cfg.sampling.prompts == [PromptEntry(from_frame=0, prompt="b")]


def test_convenience_overrides_win(tmp_path):
    cfg = load_config("tiny-test", ["sampling.seed=5", "video.num_frames=13"], num_frames=45, seed=7,
                      output=tmp_path / "o.zarr", check_paths=False)
    assert cfg.video.num_frames == 45 and cfg.sampling.seed == 7 and cfg.store.path == str(tmp_path / "o.zarr")


def test_malformed_override():
    msg = one_error(BASE, "sampling.seed")
    assert "'sampling.seed'" in msg and "KEY.PATH=VALUE" in msg
    msg = one_error(BASE, "=3")
    assert "'=3'" in msg and "KEY.PATH=VALUE" in msg
    msg = one_error(BASE, "video.num_frames.x=1")
    assert "video.num_frames" in msg and "not a section" in msg
    msg = one_error(BASE, "video.fps=[1, 2")
    assert "video.fps=[1, 2" in msg and "YAML" in msg


def test_unknown_override_key():
    msg = one_error(BASE, "video.num_frame=81")
    assert msg.startswith("unknown key 'video.num_frame' (did you mean 'video.num_frames'?")
    assert "valid keys in 'video': num_frames, height, width, fps" in msg


def test_overrides_do_not_touch_source_dict():
    source = with_(video={"num_frames": 81})
    load_config(source, ["video.num_frames=61", "strategy.context_latent_frames=1"], check_paths=False)
    assert source["video"]["num_frames"] == 81 and "strategy" not in source


# ------------------------------------------------------------------------- validation: keys/types


def test_unknown_keys_at_every_level():
    errors = errors_of({"vidoe": {}, "video": {"num_frame": 81}, "sampling": {"prompts": [
        {"from_frame": 0, "promt": "x"}]}})
    assert any(e.startswith("unknown key 'vidoe' (did you mean 'video'? valid sections: model, video, sampling,") for e in errors)
    assert any("unknown key 'video.num_frame' (did you mean 'video.num_frames'? valid keys in 'video':" in e for e in errors)
    assert any("unknown key 'sampling.prompts[0].promt' (did you mean 'sampling.prompts[0].prompt'?" in e for e in errors)
    assert any("sampling.prompts[0].prompt is missing" in e for e in errors)


def test_unknown_key_without_close_match():
    msg = one_error(with_(store={"zzzzzz": 1}))
    assert msg == ("unknown key 'store.zzzzzz' (valid keys in 'store': path, checkpoint_every_ticks, checkpoint_every_s, "
                   "heartbeat_every_s)")


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("video", "num_frames", True, "an integer"),
        ("video", "num_frames", 81.5, "an integer"),
        ("video", "num_frames", "81", "an integer"),
        ("video", "fps", "16", "a number"),
        ("video", "fps", False, "a number"),
        ("model", "path", 3, "a string"),
        ("strategy", "feature_cache", 1, "true or false"),
        ("store", "path", 5, "a string or null"),
        ("cluster", "partition", 1, "a string or null"),
        ("sampling", "seed", None, "an integer"),
    ],
)
def test_wrong_types(section, key, value, allowed):
    msg = one_error(with_(**{section: {key: value}}))
    assert msg.startswith(f"{section}.{key}={value!r} ")
    assert f"allowed: {allowed}" in msg


def test_numeric_type_conversions():
    cfg = load_config(with_(video={"num_frames": 29.0, "fps": 24}, strategy={"block_latent_frames": 2}), check_paths=False)
    assert cfg.video.num_frames == 29 and type(cfg.video.num_frames) is int
    assert cfg.video.fps == 24.0 and type(cfg.video.fps) is float


def test_non_finite_float():
    msg = one_error(with_(video={"fps": float("inf")}))
    assert "video.fps=inf" in msg and "finite" in msg


def test_section_not_a_mapping():
    msg = one_error(with_() | {"video": 5})
    assert msg.startswith("video=5 ") and "num_frames, height, width, fps" in msg


def test_prompts_wrong_shape():
    msg = one_error({"sampling": {"prompts": "a cat"}})
    assert msg.startswith("sampling.prompts='a cat' ") and "from_frame" in msg
    msg = one_error({"sampling": {"prompts": ["a cat"]}})
    assert msg.startswith("sampling.prompts[0]='a cat' ")
    msg = one_error({"sampling": {"prompts": [{"from_frame": "0", "prompt": "a"}]}})
    assert msg.startswith("sampling.prompts[0].from_frame='0' ") and "an integer" in msg


def test_prompt_and_prompts_both_given():
    msg = one_error({"sampling": {"prompt": "a", "prompts": [{"from_frame": 0, "prompt": "b"}]}})
    assert "sampling.prompt='a'" in msg and "sampling.prompts" in msg and "both" in msg
    msg = one_error({"sampling": {"prompt": 3}})
    assert msg.startswith("sampling.prompt=3 ") and "a string" in msg


# ------------------------------------------------------------------------ validation: values


@pytest.mark.parametrize("num_frames", [0, -6])
def test_num_frames_below_one_is_refused(num_frames):
    msg = one_error(with_(video={"num_frames": num_frames}))
    assert msg == f"video.num_frames={num_frames} is out of range; allowed: any whole number >= 1"


@pytest.mark.parametrize("num_frames", [1, 2, 82, 100, 499, 500, 1000])
def test_any_num_frames_is_allowed(num_frames):
    cfg = load_config(with_(video={"num_frames": num_frames}), check_paths=False)
    assert cfg.video.num_frames == num_frames


@pytest.mark.parametrize("key", ["height", "width"])
@pytest.mark.parametrize("size, nearest", [(100, "96 or 112"), (0, "16"), (-32, "16"), (8, "16")])
def test_height_width_multiple_of_16(key, size, nearest):
    msg = one_error(with_(video={key: size}))
    assert msg == f"video.{key}={size} is not a positive multiple of 16; nearest allowed: {nearest}"


@pytest.mark.parametrize(
    "num_frames, latent, blocks",
    # ceil((N - 1) / 4) + 1 latent frames, whole blocks of 8 (the last block may reach past the video)
    [(1, 1, 1), (2, 2, 1), (5, 2, 1), (6, 3, 1), (29, 8, 1), (30, 9, 2), (100, 26, 4), (1021, 256, 32), (1025, 257, 33)],
)
def test_latent_frames_and_whole_blocks(num_frames, latent, blocks):
    cfg = load_config(with_(video={"num_frames": num_frames}), check_paths=False)
    assert (cfg.num_latent_frames, cfg.num_blocks) == (latent, blocks)


def test_context_larger_than_block():
    msg = one_error(with_(video={"num_frames": 29}, strategy={"block_latent_frames": 2, "context_latent_frames": 3}))
    assert "strategy.context_latent_frames=3" in msg and "strategy.block_latent_frames=2" in msg
    assert "0 <= strategy.context_latent_frames <= 2" in msg
    cfg = load_config(with_(video={"num_frames": 29}, strategy={"block_latent_frames": 2, "context_latent_frames": 2}),
                      check_paths=False)
    assert cfg.strategy.context_latent_frames == 2


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("model", "family", "unet2d", "'wan', 'unet3d'"),
        ("model", "dtype", "fp16", "'float32', 'bfloat16', 'float16'"),
        ("sampling", "scheduler", "ddim", "'unipc', 'flow_euler'"),
        ("strategy", "name", "videoinfinite", "'dualparal', 'videoinfinity'"),
        ("strategy", "noise_init", "random", "'coordinated', 'independent'"),
        ("runtime", "device", "gpu", "'auto', 'cpu', 'cuda'"),
    ],
)
def test_enums(section, key, value, allowed):
    msg = one_error(with_(**{section: {key: value}}))
    assert msg == f"{section}.{key}={value!r} is not allowed; allowed: {allowed}"


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("video", "fps", 0, "> 0"),
        ("video", "fps", -1.5, "> 0"),
        ("sampling", "seed", -1, "0 <= seed < 2**63"),
        ("sampling", "seed", 2**63, "0 <= seed < 2**63"),
        ("sampling", "num_inference_steps", 0, ">= 1"),
        ("sampling", "guidance_scale", -0.5, ">= 0"),
        ("sampling", "flow_shift", 0, "> 0"),
        ("sampling", "max_sequence_length", 0, ">= 1"),
        ("strategy", "context_latent_frames", -1, ">= 0"),
        ("store", "checkpoint_every_ticks", 0, ">= 1"),
        ("store", "checkpoint_every_s", 0, "> 0"),
        ("runtime", "num_threads", -1, ">= 0"),
        ("cluster", "nodes", 0, ">= 1"),
        ("cluster", "gpus_per_node", 0, ">= 1"),
        ("cluster", "cpus_per_task", -2, ">= 1"),
        ("cluster", "mem_gb", 0, ">= 1"),
        ("cluster", "timeout_min", 0, ">= 1"),
    ],
)
def test_ranges(section, key, value, allowed):
    d = with_(**{section: {key: value}})
    msg = one_error(d)
    shown = repr(float(value)) if (section, key) in {("video", "fps"), ("sampling", "guidance_scale"),
                                                     ("sampling", "flow_shift"), ("store", "checkpoint_every_s")} else repr(value)
    assert msg.startswith(f"{section}.{key}={shown} ")
    assert f"allowed: {allowed}" in msg


def test_block_size_at_least_one():
    msg = one_error(with_(strategy={"block_latent_frames": 0, "context_latent_frames": 0}))
    assert msg == "strategy.block_latent_frames=0 is out of range; allowed: >= 1"


def test_seed_limits_ok():
    d = with_()
    assert load_config(d, seed=2**63 - 1, check_paths=False).sampling.seed == 2**63 - 1
    assert load_config(d, ["sampling.guidance_scale=0"], check_paths=False).sampling.guidance_scale == 0.0


# ------------------------------------------------------------------------- prompt schedule


def sched(*pairs):
    return {"sampling": {"prompts": [
        {"from_frame": f, "prompt": p} for f, p in pairs]}}


def test_prompt_schedule_empty():
    msg = one_error({"sampling": {"prompts": []}})
    assert msg.startswith("sampling.prompts=[] is empty") and "from_frame 0" in msg
    msg = one_error({})  # no prompt at all
    assert msg.startswith("sampling.prompts=[] is empty")


def test_prompt_schedule_must_start_at_0():
    msg = one_error(sched((4, "a"), (8, "b")))
    assert msg.startswith("sampling.prompts[0].from_frame=4 ") and "allowed: 0" in msg


def test_prompt_schedule_out_of_order():
    errors = errors_of(sched((0, "a"), (200, "b"), (100, "c"), (100, "d")))
    assert errors == [
        "sampling.prompts[2].from_frame=100 must be greater than sampling.prompts[1].from_frame=200: prompt schedule out of order",
        "sampling.prompts[3].from_frame=100 must be greater than sampling.prompts[2].from_frame=100: prompt schedule out of order",
    ]


def test_prompt_must_be_non_empty():
    msg = one_error(sched((0, "a"), (8, "  ")))
    assert msg == "sampling.prompts[1].prompt='  ' is empty; allowed: a non-empty string"


def test_unused_prompt_warns():
    # tiny-test blocks start at frames 0, 5, 13, 21: a prompt from 9 and another from 11 -> the first is never used
    with pytest.warns(UserWarning, match=r"sampling.prompts\[1\] \(from_frame=9\) is used by no block"):
        load_config("tiny-test", ["sampling.prompts=[{from_frame: 0, prompt: a}, {from_frame: 9, prompt: b}, "
                                  "{from_frame: 11, prompt: c}]"], check_paths=False)


# ------------------------------------------------------------------------ all errors at once


def test_all_errors_collected():
    d = {
        "video": {"num_frames": 0, "height": 100, "fps": -1},
        "sampling": {"scheduler": "ddim", "prompts": []},
        "strategy": {"context_latent_frames": 9},
        "runtime": {"devic": "cpu"},
    }
    with pytest.raises(ConfigError) as info:
        load_config(d, ["cluster.nodes=0"], check_paths=True)
    errors = info.value.errors
    keys = ["video.num_frames=0", "video.height=100", "video.fps=-1.0", "sampling.scheduler='ddim'",
            "sampling.prompts=[]", "strategy.context_latent_frames=9", "'runtime.devic'", "cluster.nodes=0",
            "store.path=None"]
    for key in keys:
        assert sum(key in e for e in errors) == 1, (key, errors)
    assert len(errors) == len(keys)
    lines = str(info.value).splitlines()
    assert lines[0] == f"invalid configuration ({len(keys)} errors):"
    assert [line.strip() for line in lines[1:]] == errors


def test_config_error_pickles():
    err = ConfigError(["a", "b"])
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == ["a", "b"] and str(again) == str(err)


# ---------------------------------------------------------------------------------- paths


def test_store_path_required():
    msg = one_error(BASE, check_paths=True)
    assert msg.startswith("store.path=None is not set") and "--output" in msg and "store.path" in msg


def test_store_path_new_in_writable_dir(tmp_path):
    d = with_()
    cfg = load_config(d, output=tmp_path / "a" / "b" / "run.zarr")
    assert cfg.store.path == str(tmp_path / "a" / "b" / "run.zarr")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "existing.zarr").mkdir()
    load_config(d, output=tmp_path / "existing.zarr")


def test_store_path_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    d = with_()
    msg = one_error(d, output=tmp_path / "f", check_paths=True)
    assert msg.startswith(f"store.path={str(tmp_path / 'f')!r} exists and is not a directory")
    msg = one_error(d, output=tmp_path / "f" / "sub" / "run.zarr", check_paths=True)
    assert f"store.path={str(tmp_path / 'f' / 'sub' / 'run.zarr')!r}" in msg and "is not a directory" in msg


def test_store_path_not_writable(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    d = with_()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # works when the tests run as root, too
    msg = one_error(d, output=tmp_path / "ro", check_paths=True)
    assert "is a directory that is not writable" in msg and "allowed:" in msg
    msg = one_error(d, output=tmp_path / "ro" / "new.zarr", check_paths=True)
    assert f"nearest existing folder {str(tmp_path / 'ro')!r} is not writable" in msg


def test_store_path_relative_kept_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(with_(), output="runs/x.zarr")
    assert cfg.store.path == "runs/x.zarr"
    assert not (tmp_path / "runs").exists()


def test_model_path(tmp_path, monkeypatch):
    d = with_()
    out = str(tmp_path / "run.zarr")
    msg = one_error(d, f"model.path={tmp_path / 'nope'}", output=out, check_paths=True)
    assert msg.startswith(f"model.path={str(tmp_path / 'nope')!r} does not exist") and "model_index.json" in msg
    assert "'tiny'" in msg
    (tmp_path / "file").write_text("")
    msg = one_error(d, f"model.path={tmp_path / 'file'}", output=out, check_paths=True)
    assert "is not a directory" in msg
    model = tmp_path / "Wan-Diffusers"
    model.mkdir()
    msg = one_error(d, f"model.path={model}", output=out, check_paths=True)
    assert msg.startswith(f"model.path={str(model)!r} has no model_index.json")
    (model / "model_index.json").write_text("{}")
    assert load_config(d, [f"model.path={model}"], output=out).model.path == str(model)
    # relative paths are kept as given and checked against the CWD
    monkeypatch.chdir(tmp_path)
    assert load_config(d, ["model.path=Wan-Diffusers"], output=out).model.path == "Wan-Diffusers"


# -------------------------------------------------------------------------- dict round trip


def test_to_dict_from_dict_round_trip():
    cfg = load_config("tiny-cpu", check_paths=False)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert isinstance(d["sampling"]["prompts"], list) and isinstance(d["sampling"]["prompts"][0], dict)
    again = RunConfig.from_dict(d)
    assert again == cfg and again.to_dict() == d
    # and through YAML, as a user would save it
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_from_dict_validates():
    d = load_config("tiny-test", check_paths=False).to_dict()
    d["video"]["num_frames"] = 0
    with pytest.raises(ConfigError, match="video.num_frames=0"):
        RunConfig.from_dict(d)


def test_validate_config_and_source_runconfig():
    cfg = load_config("tiny-test", check_paths=False)
    cfg.video.num_frames = -1
    with pytest.raises(ConfigError, match="video.num_frames=-1"):
        validate_config(cfg)
    cfg.video.num_frames = 13  # blocks start at frames 0 and 5: the prompt from frame 9 is never used
    with pytest.warns(UserWarning, match="used by no block"):
        assert validate_config(cfg).num_blocks == 2
    cfg.video.num_frames = 29
    assert load_config(cfg, seed=3, check_paths=False).sampling.seed == 3


# ------------------------------------------------------------------------------------ diffs


def test_config_diff():
    a = {"video": {"num_frames": 29, "fps": 16.0}, "sampling": {"seed": 0, "prompts": [{"from_frame": 0, "prompt": "a"}]},
         "store": {"path": "x"}}
    b = {"video": {"num_frames": 29, "fps": 16.0}, "sampling": {"seed": 1, "prompts": [{"from_frame": 0, "prompt": "b"}]},
         "store": {"path": "y"}, "runtime": {"device": "cpu"}}
    assert config_diff(a, b) == [
        ("runtime.device", MISSING, "cpu"),
        ("sampling.prompts", [{"from_frame": 0, "prompt": "a"}], [{"from_frame": 0, "prompt": "b"}]),
        ("sampling.seed", 0, 1),
        ("store.path", "x", "y"),
    ]
    assert config_diff(a, b, ignore=("store", "runtime", "sampling.prompts")) == [("sampling.seed", 0, 1)]
    assert config_diff(a, a) == []
    # a section name prefix is not a key prefix: "sampling.seed" does not ignore "sampling.seedling"
    assert config_diff({"s": {"seedling": 1}}, {"s": {"seedling": 2}}, ignore=("s.seed",)) == [("s.seedling", 1, 2)]


def test_identity_dict():
    cfg = load_config("tiny-test", check_paths=False)
    d = cfg.to_dict()
    ident = identity_dict(d)
    assert "num_frames" not in ident["video"] and "height" in ident["video"]
    assert "store" not in ident and "runtime" not in ident and "cluster" not in ident
    assert d["video"]["num_frames"] == 29 and "store" in d  # the input is untouched
    assert IDENTITY_IGNORED == ("video.num_frames", "store", "runtime", "cluster", "model.text_encoder_device")
    assert "text_encoder_device" not in ident["model"] and "dtype" in ident["model"]  # where it runs, not what
    # resuming/extending: these may change; anything else is a different run
    longer = load_config("tiny-test", num_frames=45, output="elsewhere.zarr", check_paths=False).to_dict()
    assert config_diff(d, longer, ignore=IDENTITY_IGNORED) == []
    assert config_diff(identity_dict(d), identity_dict(longer)) == []
    other = load_config("tiny-test", seed=1, check_paths=False).to_dict()
    assert config_diff(identity_dict(d), identity_dict(other)) == [("sampling.seed", 0, 1)]


def test_config_diff_fills_keys_a_store_predates_from_the_defaults():
    """A store written before a key existed ran with that key's default: equal unless the command
    sets another value; a key unknown to the defaults still shows as missing."""
    defaults = RunConfig().to_dict()
    old = RunConfig().to_dict()
    del old["strategy"]["global_frames"], old["store"]["heartbeat_every_s"]
    old["legacy"] = {"x": 1}
    new = RunConfig().to_dict()
    assert config_diff(old, new, defaults=defaults) == [("legacy.x", 1, MISSING)]
    new["strategy"]["global_frames"] = defaults["strategy"]["global_frames"] + 1
    assert config_diff(old, new, ignore=("legacy",), defaults=defaults) == [
        ("strategy.global_frames", defaults["strategy"]["global_frames"], defaults["strategy"]["global_frames"] + 1)]
    assert ("strategy.global_frames", MISSING, new["strategy"]["global_frames"]) in config_diff(old, new)


def test_format_diff():
    text = format_diff([("sampling.seed", 0, 1), ("sampling.scheduler", "unipc", "flow_euler"), ("runtime.device", MISSING, "cpu")])
    assert text.splitlines() == [
        "  sampling.seed: store has 0, command has 1",
        "  sampling.scheduler: store has 'unipc', command has 'flow_euler'",
        "  runtime.device: store has <missing>, command has 'cpu'",
    ]
    assert format_diff([]) == ""


def test_float_override_in_exponent_notation_without_a_dot():
    from hpcvideo.config import load_config

    cfg = load_config("tiny-test", ["store.checkpoint_every_s=1e-6"], check_paths=False)
    assert cfg.store.checkpoint_every_s == 1e-6
