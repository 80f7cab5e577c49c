"""End-to-end evaluation through lmms-eval, offline: a tiny saved model on tiny saved tasks.

The targets are what leanvlm's own API produces for each sample (greedy answers; the choice with the
highest mean token log-likelihood, lmms-eval's convention), so the scores lmms-eval writes must be exactly 1.0: that checks the plugin
runs the same model, prompt and method as the API. Skipped when lmms-eval is not installed.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import build

import leanvlm as lv
from leanvlm.cli.main import main
from leanvlm.presets import chat_inputs, demo_image

pytest.importorskip("lmms_eval")
pytestmark = pytest.mark.eval

TASKS = Path(__file__).parent / "eval_tasks"
QUESTIONS = ["What is shown in this image?", "Describe the picture in detail.", "What color is the car?"]
CHOICES = ["a cat", "two trees", "the sky"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model, proc = build("llava", num_layers=4)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def expected_rows(path, method):
    """Answers and choices leanvlm's Python API gives for each sample, with ``method`` applied."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    rows = []
    with lv.apply(model, *([method] if method else [])) as applied, torch.inference_mode():
        for i, question in enumerate(QUESTIONS):
            image = demo_image(56, seed=i)
            inputs = chat_inputs(proc, question, [image])
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            answer = proc.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            scores = []
            prompt_length = inputs["input_ids"].shape[1]
            for choice in CHOICES:
                cont = proc.tokenizer(" " + choice, add_special_tokens=False, return_tensors="pt")[
                    "input_ids"
                ]
                full = dict(
                    inputs,
                    input_ids=torch.cat([inputs["input_ids"], cont], -1),
                    attention_mask=torch.ones(
                        1, inputs["input_ids"].shape[1] + cont.shape[1], dtype=torch.long
                    ),
                )
                with applied.prompt_length(prompt_length):  # rank with the prompt, not the candidate answer
                    logits = model(**full).logits
                logp = torch.log_softmax(logits[0, -cont.shape[1] - 1 : -1].float(), -1)
                scores.append(float(logp.gather(-1, cont[0][:, None]).mean()))  # lmms-eval: mean token loss
            rows.append(
                {
                    "image": image,
                    "question": question,
                    "answer": answer.strip(),
                    "choices": CHOICES,
                    "label": max(range(len(CHOICES)), key=scores.__getitem__),
                }
            )
    return rows


def task_dir(tmp_path, rows) -> Path:
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    data = tmp_path / "data"
    features = Features(
        {
            "image": Image(),
            "question": Value("string"),
            "answer": Value("string"),
            "choices": Sequence(Value("string")),
            "label": Value("int64"),
        }
    )
    DatasetDict({"test": Dataset.from_list(rows, features=features)}).save_to_disk(str(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(TASKS / "utils.py", tasks / "utils.py")
    for name in ("tiny_vqa.yaml", "tiny_mc.yaml"):
        (tasks / name).write_text((TASKS / name).read_text().replace("DATASET_DIR", str(data)))
    return tasks


def results_of(out: Path) -> dict:
    found = sorted(out.rglob("*results*.json"))
    assert found, f"lmms-eval wrote no results under {out}"
    return json.loads(found[-1].read_text())["results"]


def test_lmms_eval_cli_with_no_method(saved_model, tmp_path):
    tasks = task_dir(tmp_path, expected_rows(saved_model, None))
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        "leanvlm",
        "--model_args",
        f"pretrained={saved_model},method=none,max_new_tokens=4,stats_path={stats}",
        "--tasks",
        "leanvlm_tiny_vqa,leanvlm_tiny_mc",
        "--include_path",
        str(tasks),
        "--batch_size",
        "1",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_of(out)
    assert results["leanvlm_tiny_vqa"]["exact_match,none"] == 1.0
    assert results["leanvlm_tiny_mc"]["acc,none"] == 1.0
    recorded = json.loads(stats.read_text())
    assert recorded["samples"] == len(QUESTIONS)
    assert recorded["mean"]["visual_tokens_in"] == recorded["mean"]["visual_tokens_kept"] == 16
    assert recorded["mean"]["prefill_flops"] > 0 and recorded["mean"]["prefill_ms"] > 0


def test_leanvlm_eval_with_fastv_and_batches(saved_model, tmp_path, capsys):
    method = lv.FastV(layer=2, keep_ratio=0.5)
    tasks = task_dir(tmp_path, expected_rows(saved_model, method))
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--model",
            str(saved_model),
            "--method",
            "fastv:layer=2,keep_ratio=0.5",
            "--tasks",
            "leanvlm_tiny_vqa,leanvlm_tiny_mc",
            "--include-path",
            str(tasks),
            "--batch-size",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    results = results_of(out)
    assert (
        results["leanvlm_tiny_vqa"]["exact_match,none"] == 1.0
    )  # a padded batch of 2 gives the same answers
    assert results["leanvlm_tiny_mc"]["acc,none"] == 1.0
    recorded = json.loads((out / "leanvlm_stats.json").read_text())
    assert (
        recorded["mean"]["visual_tokens_kept"] == 8
        and recorded["mean"]["equivalent_tokens"] == (2 * 16 + 2 * 8) / 4
    )
    assert recorded["model"]["method"].startswith("FastV(layer=2, keep_ratio=0.5")
    assert "leanvlm_tiny_vqa: exact_match=1" in capsys.readouterr().out


def test_bad_model_args_give_the_methods_own_error(saved_model, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        "leanvlm",
        "--model_args",
        f"pretrained={saved_model},method=fastv,keep_ratio=1.5",
        "--tasks",
        "leanvlm_tiny_vqa",
        "--include_path",
        str(TASKS),
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert "FastV: keep_ratio=1.5 is outside (0, 1]" in proc.stdout + proc.stderr
    assert not list((tmp_path / "out").rglob("*results*.json"))


def test_leanvlm_eval_validates_before_starting_lmms_eval(saved_model, tmp_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(saved_model),
            "--method",
            "pyramiddrop:layers=[2,1],keep_ratios=[0.5,0.25]",
            "--tasks",
            "x",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "PyramidDrop: layers=(2, 1) must be strictly increasing (2 then 1)" in capsys.readouterr().err
