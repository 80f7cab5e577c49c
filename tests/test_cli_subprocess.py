"""Every command as a user runs it: a real subprocess on a saved tiny LLaVA and Qwen2-VL (loaded with the
real loading code, the Qwen one without torchvision's video processor), and the bad inputs a newcomer
hits, each answered with one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from leanvlm.presets import build_preset, demo_image


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, preset in (("llava", "tiny"), ("qwen", "tiny-qwen2-vl")):
        model, processor = build_preset(preset)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
        )
    ).save_pretrained(root / "llama")
    demo_image(112, seed=3).save(root / "picture.png")
    conversation = [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "Two squares on a gradient."},
    ]
    (root / "data.json").write_text(json.dumps([{"image": "picture.png", "conversations": conversation}] * 2))
    (root / "not-an-image.png").write_text("text")
    return root


def leanvlm(*argv, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "leanvlm", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The error a command printed: its last stderr line, and nothing like a traceback before it."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize("name", ["llava", "qwen"])
def test_generate_runs_a_saved_checkpoint(saved, name):
    result = leanvlm(
        "generate",
        "--model",
        saved / name,
        "--image",
        saved / "picture.png",
        "--method",
        "pyramiddrop",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    visual = info["runs"][0]["visual_per_layer"]
    assert visual[0] > visual[-1] > 0  # the method ran, with its defaults scaled to 4 layers
    assert "pyramiddrop -> PyramidDrop(layers=(1, 2, 3)" in result.stderr  # the resolved setting, said


def test_generate_without_an_image_says_it_uses_a_synthetic_one(saved):
    result = leanvlm("generate", "--model", saved / "llava", "--max-new-tokens", "2", "--method", "none")
    assert result.returncode == 0, result.stderr
    assert "no --image given: using a synthetic 56x56 picture" in result.stderr


def test_viz_flops_bench_and_train_run(saved, tmp_path):
    for name in ("llava", "qwen"):
        viz = leanvlm("viz", "--model", saved / name, "--method", "vcc", "--out", tmp_path / name)
        assert viz.returncode == 0, viz.stderr
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
            "stage0_input.png",
            "stage1_layer2.png",
        ]
    train = leanvlm(
        "train",
        "--model",
        saved / "llava",
        "--data",
        saved / "data.json",
        "--output-dir",
        tmp_path / "run",
        "--max-steps",
        "1",
        "--method",
        "pyramiddrop",
        "--no-progress",
    )
    assert train.returncode == 0, train.stderr
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 1
    flops = leanvlm("flops", "--model", saved / "llava", "--method", "pyramiddrop", "--json")
    assert flops.returncode == 0, flops.stderr
    assert json.loads(flops.stdout)["methods"][0]["layers"][1]["visual"] == 8
    bench = leanvlm(
        "bench",
        "--model",
        saved / "qwen",
        "--methods",
        "fastv",
        "--budgets",
        "default",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--out",
        tmp_path / "bench.json",
        "--no-progress",
    )
    assert bench.returncode == 0, bench.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows[-1]["settings"].startswith("FastV(layer=2, keep_ratio=0.5")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate", "--model", "{root}/llama"],
            "is a LlamaForCausalLM, which leanvlm does not support; supported: Llava",
        ),
        (["generate", "--model", "{root}/missing"], "no such folder"),
        (["viz", "--model", "{root}/missing"], "no such folder"),
        (["flops", "--model", "{root}/llama"], "does not support; supported:"),
        (["bench", "--model", "{root}/llama", "--no-progress"], "does not support; supported:"),
        (["generate", "--method", "warpdrive"], "unknown method 'warpdrive'"),
        (
            ["generate", "--model", "{root}/llava", "--image", "{root}/not-an-image.png"],
            "cannot be read as an image",
        ),
        (
            ["train", "--model", "{root}/llama", "--data", "{root}/data.json", "--output-dir", "{root}/o"],
            "supported:",
        ),
        (["eval", "--model", "{root}/llava", "--method", "warpdrive", "--tasks", "mme"], "unknown method"),
    ],
    ids=[
        "llama",
        "missing",
        "viz-missing",
        "flops-llama",
        "bench-llama",
        "bad-method",
        "bad-image",
        "train",
        "eval",
    ],
)
def test_bad_inputs_get_one_line_and_exit_code_2(saved, argv, message):
    result = leanvlm(*[a.format(root=saved) for a in argv])
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"leanvlm {argv[0]}: error:") and message in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", ["generate", "bench", "viz", "train"])
def test_cuda_without_cuda_is_one_line(saved, command):
    extra = ["--data", saved / "x.json", "--output-dir", saved / "out"] if command == "train" else []
    result = leanvlm(command, "--model", saved / "llava", "--device", "cuda", *extra)
    assert result.returncode == 2
    assert "CUDA is not available on this machine" in error_line(result)


def test_debug_shows_the_traceback(saved):
    result = leanvlm("generate", "--model", saved / "missing", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr
