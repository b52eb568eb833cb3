"""Wan2.2 model folders: what hpcvideo does not use is refused by name before any work; the two experts of
T2V-A14B (tiny two-expert folder: hpcvideo/models/tiny_wan22.py) in both strategies."""

import json
import shutil

import pytest

from hpcvideo.models.support import REFUSED, refused
from tests.helpers import cli


def variant(tmp_path, source, name, *, index=None, transformer=None):
    """A copy of the model folder ``source`` (subfolders linked, not copied) whose model_index.json and
    transformer/config.json get the entries of ``index`` / ``transformer``."""
    folder = tmp_path / name
    folder.mkdir()
    for item in source.iterdir():
        if item.is_dir() and not (item.name == "transformer" and transformer):
            (folder / item.name).symlink_to(item, target_is_directory=True)
    model_index = json.loads((source / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**model_index, **(index or {})}))
    if transformer:
        shutil.copytree(source / "transformer", folder / "transformer")
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, **transformer}))
    return folder


# what a folder sets -> the name the refusal must give
UNSUPPORTED = {
    "ti2v": ({"expand_timesteps": True}, None, "expand_timesteps"),
    "i2v-encoder": ({"image_encoder": ["transformers", "CLIPVisionModel"]}, None, "image_encoder"),
    "i2v-processor": ({"image_processor": ["transformers", "CLIPImageProcessor"]}, None, "image_processor"),
    "i2v-pipeline": ({"_class_name": "WanImageToVideoPipeline"}, None, "WanImageToVideoPipeline"),
    "vace": ({"vace_encoder": ["diffusers", "Something"]}, None, "vace_encoder"),
    "image-dim": (None, {"image_dim": 1280}, "image_dim"),
}


@pytest.mark.unit
def test_supported_folders_are_not_refused(tiny_model_dir, tiny_unet3d_dir):
    from hpcvideo.config import DEMO_WEIGHTS_DIR

    assert refused(tiny_model_dir, "wan") == [] and refused(DEMO_WEIGHTS_DIR, "wan") == []
    assert refused(tiny_unet3d_dir, "unet3d") == []


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_a_folder_naming_what_hpcvideo_does_not_use_is_refused_by_name(tmp_path, tiny_model_dir, case):
    index, transformer, name = UNSUPPORTED[case]
    folder = variant(tmp_path, tiny_model_dir, case, index=index, transformer=transformer)
    problems = refused(folder, "wan")
    assert len(problems) == 1 and name in problems[0] and "allowed" in problems[0], problems
    if name in REFUSED:
        assert REFUSED[name] in problems[0]  # says what it is


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["check", "plan", "generate"])
def test_refused_before_any_work(tmp_path, tiny_model_dir, command):
    """check, plan and generate (and so sbatch/submit, which run the same checks) exit 2 naming the entry,
    and nothing is created."""
    folder = variant(tmp_path, tiny_model_dir, "ti2v", index={"expand_timesteps": True})
    output = tmp_path / "run.zarr"
    result = cli(command, "tiny-test", "--set", f"model.path={folder}", "--output", output, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "expand_timesteps=true" in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()
