"""Trainable parts: attached before the optimizer, trained, saved beside the base checkpoint, loaded on a
model of the same shape only, and kept identical across data-parallel processes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import PROMPTS, build, make_inputs
from plugin_trainable import LearnedTokens
from test_train import data_dir, trainer_for  # noqa: F401  (fixture)

import leanvlm as lv
from leanvlm.presets import build_preset
from leanvlm.train import ReductionCallback

TESTS = Path(__file__).parent
METHOD = LearnedTokens(layer=1, count=2)


def fresh(num_layers=5):
    model, proc = build("llava", num_layers=num_layers)
    return copy.deepcopy(model), proc


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def test_prepare_registers_parameters_once():
    model, _ = fresh()
    before = sum(p.numel() for p in model.parameters())
    registry = lv.prepare(model, METHOD, lv.FastV())  # methods without trainable parts are skipped
    assert list(registry.keys()) == ["LearnedTokens"]
    tokens = registry["LearnedTokens"].tokens
    assert sum(p.numel() for p in model.parameters()) == before + tokens.numel()
    assert any(p is tokens for p in model.parameters())  # an optimizer built now trains them
    with torch.no_grad():
        tokens.add_(1.0)
    snapshot = tokens.detach().clone()
    lv.prepare(model, METHOD)  # again: keeps the (trained) weights
    assert torch.equal(model.leanvlm_modules["LearnedTokens"].tokens, snapshot)
    with pytest.raises(lv.ConfigError, match="prepare\\(\\) takes method configs"):
        lv.prepare(model, "learned-tokens")


def test_save_and_load_beside_a_checkpoint(tmp_path):
    model, proc = fresh()
    inputs = make_inputs(proc, PROMPTS[:2])
    torch.manual_seed(3)
    lv.prepare(model, METHOD)
    with lv.apply(model, METHOD):
        expected = _logits(model, inputs)
    assert lv.save_modules(model, tmp_path) is not None
    assert json.loads((tmp_path / "leanvlm_modules.json").read_text())["modules"] == ["LearnedTokens"]
    other, _ = fresh()
    lv.load_modules(other, tmp_path, METHOD)
    with lv.apply(other, METHOD):
        torch.testing.assert_close(_logits(other, inputs), expected)
    bare, _ = fresh()
    with pytest.raises(lv.ConfigError, match="trainable parts that are not on this"):
        lv.apply(bare, METHOD)


def test_loading_on_a_model_of_another_shape_is_refused(tmp_path):
    model, _ = fresh()
    lv.prepare(model, METHOD)
    lv.save_modules(model, tmp_path)
    deeper, _ = fresh(num_layers=6)
    with pytest.raises(lv.ConfigError, match="another shape \\(num_layers: saved 5, this model 6\\)"):
        lv.load_modules(deeper, tmp_path, METHOD)
    assert deeper._modules.get("leanvlm_modules") is None  # nothing attached by a refused load
    with pytest.raises(
        lv.ConfigError, match="holds modules for \\['LearnedTokens'\\], not for \\['Wider'\\]"
    ):

        class Wider(LearnedTokens):
            pass

        lv.load_modules(fresh()[0], tmp_path, Wider())
    with pytest.raises(lv.ConfigError, match="has no leanvlm_modules.json"):
        lv.load_modules(fresh()[0], tmp_path / "missing", METHOD)


@pytest.fixture
def registered():
    """Trainer checkpoints name their methods: register the test-only method for one test."""
    from leanvlm.registry import METHODS, register_method

    register_method("learned-tokens")(LearnedTokens)
    try:
        yield
    finally:
        METHODS.pop("learned-tokens", None)


def test_trainer_trains_the_modules_the_callback_attached(data_dir, tmp_path, registered):  # noqa: F811
    model, proc = build_preset("tiny", num_layers=5)
    model.train()
    torch.manual_seed(0)
    callback = ReductionCallback(METHOD)
    trainer = trainer_for(model, proc, data_dir, tmp_path, callback, max_steps=3)
    tokens = model.leanvlm_modules["LearnedTokens"].tokens  # attached when the Trainer was built
    start = tokens.detach().clone()
    trainer.train()
    assert not torch.equal(tokens.detach(), start)
    callback.on_save(trainer.args, trainer.state, trainer.control, model=trainer.model)
    saved = tmp_path / "checkpoint-3"
    assert (saved / "leanvlm_modules.safetensors").exists()
    other, _ = build_preset("tiny", num_layers=5)
    lv.load_modules(other, saved, METHOD)
    assert torch.equal(other.leanvlm_modules["LearnedTokens"].tokens, tokens.detach())


@pytest.mark.timeout(600)
def test_train_under_accelerate_ddp_keeps_ranks_identical(data_dir, tmp_path):  # noqa: F811
    """``leanvlm train`` under ``accelerate launch`` with two processes on the CPU (DDP over gloo), with a
    method applied and a test-only trainable module: both processes end with the same weights.

    accelerate 1.x starts one process for ``--cpu`` (its simple launcher; several CPU processes need
    MPI), so the test uses its multi-process launcher, and ``leanvlm train --device cpu`` trains on the CPU."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--multi_gpu",
        "-m",
        "leanvlm",
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data_dir / "data.json"),
        "--output-dir",
        str(out),
        "--import",
        "plugin_cli",
        "--method",
        "learned-tokens:layer=1,count=2",
        "--max-steps",
        "3",
        "--batch-size",
        "1",
        "--lr",
        "1e-2",
        "--logging-steps",
        "1",
        "--save-steps",
        "100",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["weights_digest"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert summary["steps"] == 3 and all(loss == loss for loss in summary["losses"])
    assert (out / "leanvlm_modules.safetensors").exists()
    from safetensors.torch import load_file

    assert not any(k.startswith("leanvlm_modules") for k in load_file(out / "model.safetensors"))


def test_a_refused_load_leaves_modules_registered_before(tmp_path):
    model, _ = fresh()
    lv.prepare(model, METHOD)
    lv.save_modules(model, tmp_path)
    other, _ = fresh()
    wider = LearnedTokens(layer=1, count=3)  # same key, another shape
    lv.prepare(other, wider)
    trained = other.leanvlm_modules["LearnedTokens"].tokens.detach().clone()
    with pytest.raises(
        lv.ConfigError, match="'LearnedTokens.tokens' has shape \\[2, 64\\], this model's \\[3, 64\\]"
    ):
        lv.load_modules(other, tmp_path, wider)
    assert torch.equal(other.leanvlm_modules["LearnedTokens"].tokens, trained)  # still there, untouched
    with pytest.raises(lv.ConfigError, match="needs the trainable methods"):
        lv.load_modules(other, tmp_path, lv.FastV())
