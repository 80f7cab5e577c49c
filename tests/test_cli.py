"""The leanvlm command on tiny models, including a checkpoint saved to disk and loaded back."""

import json
import subprocess
import sys

import pytest
from models import build

import leanvlm as lv
from leanvlm.cli.main import main
from leanvlm.methods.spec import parse_method, split_top_level
from leanvlm.presets import demo_image


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_generate(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "generate" in capsys.readouterr().out


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "leanvlm", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "generate" in result.stdout


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny LLaVA saved like a real checkpoint (weights, config, processor, chat template)."""
    model, proc = build("llava", num_layers=4)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    image = path / "image.png"
    demo_image(80, seed=3).save(image)
    return path, image


def test_generate_on_saved_checkpoint_json(capsys, saved_model):
    path, image = saved_model
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(path),
        "--image",
        str(image),
        "--method",
        "fastv:layer=2,keep_ratio=0.25",
        "--compare",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert code == 0
    info = json.loads(out)
    none, fastv = info["runs"]
    assert none["method"] == "none" and fastv["method"].startswith("FastV(layer=2, keep_ratio=0.25")
    assert none["visual_per_layer"] == [16, 16, 16, 16]
    assert fastv["visual_per_layer"] == [16, 16, 4, 4]
    assert fastv["tokens_per_layer"][2] == info["prompt_tokens"] - 12
    assert isinstance(fastv["output"], str)


def test_generate_text_output_two_images(capsys, saved_model):
    path, image = saved_model
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(path),
        "--image",
        str(image),
        "--image",
        str(image),
        "--method",
        "pyramiddrop:layers=[1,2,3],keep_ratios=[0.5,0.25,0.125]",
        "--max-new-tokens",
        "2",
    )
    assert code == 0
    assert "visual tokens per layer: 32 x1, 16 x1, 8 x1, 4 x1" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "fastv:keep_ratio=1.5"], "FastV: keep_ratio=1.5 is outside (0, 1]"),
        (
            ["--method", "fastv:layers=3"],
            "FastV: unknown argument(s) layers; allowed: keep_ratio, keep_tokens, layer",
        ),
        (
            ["--method", "warpdrive"],
            "unknown method 'warpdrive'; registered methods: cdpruner, crossget, divprune, fastv",
        ),
        (["--method", "fastv:2"], "method argument '2' is not of the form key=value"),
        (["--image", "/nonexistent.png"], "--image '/nonexistent.png' cannot be read as an image"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    ],
)
def test_generate_bad_arguments(capsys, argv, message):
    code, _, err = run_cli(capsys, "generate", *argv)
    assert code == 2
    assert message in err


def test_layer_beyond_model_depth_from_cli(capsys, saved_model):
    path, image = saved_model
    code, _, err = run_cli(capsys, "generate", "--model", str(path), "--method", "fastv:layer=9")
    assert code == 2
    assert "FastV: layer=9 is outside [1, 3] for this model (4 decoder layers)" in err


def test_method_spec_parsing():
    assert split_top_level("a=1,b=[1,2],c='x,y'") == ["a=1", "b=[1,2]", "c='x,y'"]
    assert parse_method(
        "pyramiddrop:layers=[2,4],keep_ratios=(0.5,0.25),positions=original"
    ) == lv.PyramidDrop(layers=(2, 4), keep_ratios=(0.5, 0.25), positions="original")
    assert parse_method("FastV:keep_tokens=64") == lv.FastV(keep_tokens=64)
    assert parse_method("none") is None


def test_method_names_resolve_to_the_depths_defaults():
    """A bare name takes the method's defaults for the model's depth; a spec that sets a depth-dependent
    argument is taken as written; other arguments keep the depth's defaults."""
    from leanvlm.methods.spec import resolve_method

    assert resolve_method("pyramiddrop", 32) == lv.PyramidDrop()
    assert resolve_method("pyramiddrop", 8).layers == (2, 4, 6)
    assert resolve_method("pyramiddrop:query='text'", 8).layers == (2, 4, 6)
    assert resolve_method("pyramiddrop:layers=[1,2,3]", 8).layers == (1, 2, 3)
    assert resolve_method("fastv", 4) == lv.FastV()  # lv.FastV() fits: nothing changes
    assert resolve_method("visionzip:dominant=10,contextual=4", 32) == lv.VisionZip(dominant=10, contextual=4)
    assert resolve_method("random", 5) == lv.RandomDrop()
    assert resolve_method("proxyv", 16).start_layer == 6
    assert resolve_method("none", 8) is None
    assert resolve_method("pyramiddrop:query='text'", 3) == lv.PyramidDrop(query="text")  # no default fits
