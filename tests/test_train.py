"""Training with token reduction: schedules, the Trainer callback, losses, gradients, the recipe."""

import functools
import json
import logging

import pytest
import torch
from models import build

import leanvlm as lv
from leanvlm import compat
from leanvlm.cli.main import main
from leanvlm.presets import build_preset, demo_image
from leanvlm.train import LlavaJsonDataset, ReductionCallback, collate

PDROP = lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125))
VCC = lv.VisualContextCompression(layer=1, stride=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny LLaVA-format dataset: multi-turn conversations about generated images."""
    root = tmp_path_factory.mktemp("data")
    records = []
    for i in range(4):
        demo_image(56 + 28 * (i % 2), seed=i).save(root / f"img{i}.png")
        records.append(
            {
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown in this image?"},
                    {
                        "from": "gpt",
                        "value": "A cat on a red chair." if i % 2 else "Two trees and a blue sky.",
                    },
                    {"from": "human", "value": "What color is it?"},
                    {"from": "gpt", "value": "red" if i % 2 else "blue"},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    return root


def train_argv(data_dir, out, method: str, *extra: str) -> list[str]:
    """``leanvlm train`` on the tiny preset for 8 steps of batches of 2, logging every step."""
    return [
        *("train", "--preset", "tiny", "--data", str(data_dir / "data.json"), "--output-dir", str(out)),
        *("--max-steps", "8", "--batch-size", "2", "--logging-steps", "1", "--save-steps", "100"),
        *("--method", method, "--no-progress", *extra),
    ]


def checkpointing_grads(model, method, batch, before_each=None) -> dict:
    """Gradients of one training forward with ``method`` applied, without and with activation
    checkpointing ({False: grads, True: grads}); on transformers < 5.23 the checkpointed one must be
    refused, naming the version (then only False is there). ``before_each()`` runs before each pass."""
    model.train()
    replays = compat.checkpoint_reruns_hooks(model.model.language_model.layers[0])
    grads = {}
    for on in (False, True):
        model.zero_grad()
        compat.set_checkpointing(model, on, use_reentrant=False)
        if before_each is not None:
            before_each()
        try:
            with lv.apply(model, method):
                if on and replays:
                    with pytest.raises(lv.CompatError, match="needs transformers >= 5.23"):
                        model(**batch)
                    continue
                model(**batch).loss.backward()
        finally:
            compat.set_checkpointing(model, False)
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if True in grads:
        assert grads[True].keys() == grads[False].keys()
        for name, g in grads[False].items():
            torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4)
    return grads


def trainer_for(model, proc, data_dir, out, callback, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=kw.pop("lr", 3e-3),
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        **{"save_strategy": "no", **kw},
    )
    dataset = LlavaJsonDataset(data_dir / "data.json", proc)
    collator = functools.partial(collate, pad_token_id=proc.tokenizer.pad_token_id)
    return Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[callback]
    )


def fresh(preset="tiny"):
    model, proc = build_preset(preset, num_layers=5)
    model.train()
    return model, proc


def test_schedule_presets_and_steps():
    s = lv.StagedSchedule.preset("4stage")
    assert s.boundaries(5200) == [0, 1300, 2600, 3900]  # LLaVolta's pivots on LLaVA-1.5 SFT
    assert [s.stage_index(t, 5200) for t in (0, 1299, 1300, 2599, 2600, 3899, 3900, 5199)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert s.method_at(5199, 5200) is None  # the last stage trains uncompressed
    assert s.method_at(0, 5200) == lv.VisualContextCompression(layer=2, stride=8)
    assert lv.StagedSchedule.preset("light").method_at(10, 20) == lv.VisualContextCompression(
        layer=16, stride=8
    )
    with pytest.raises(lv.ConfigError, match="fractions sum to 0.75; they must sum to 1"):
        lv.StagedSchedule(((0.5, VCC), (0.25, None)))
    with pytest.raises(lv.ConfigError, match="unknown preset 'medium'"):
        lv.StagedSchedule.preset("medium")


def test_schedule_advances_on_optimizer_steps_not_forward_calls(data_dir, tmp_path):
    model, proc = fresh()
    schedule = lv.StagedSchedule(
        ((0.25, VCC), (0.25, PDROP), (0.25, lv.FastV(layer=2, keep_ratio=0.5)), (0.25, None))
    )
    callback = ReductionCallback(schedule)
    trainer = trainer_for(
        model, proc, data_dir, tmp_path, callback, max_steps=8, gradient_accumulation_steps=2
    )
    trainer.train()
    assert callback.switches == [(0, 0), (2, 1), (4, 2), (6, 3)]  # 16 forward calls, 8 optimizer steps
    assert callback.handle is None and not lv.remove(model)  # removed at the end of training


def test_conversations_start_with_the_user():
    from leanvlm.train.data import to_messages

    conv = [
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "<image>\nHi?"},
        {"from": "gpt", "value": "A cat."},
    ]
    assert [m["role"] for m in to_messages(conv)] == ["user", "assistant"]


def test_llava_next_batches_with_different_tile_counts_collate(tmp_path):
    model, proc = build_preset("tiny-llava-next", num_layers=5)
    records = []
    for i, size in enumerate((56, 112)):
        demo_image(size, seed=i).save(tmp_path / f"im{i}.png")
        records.append(
            {
                "image": f"im{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": "A cat."},
                ],
            }
        )
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = LlavaJsonDataset(tmp_path / "d.json", proc)
    batch = collate([dataset[0], dataset[1]], proc.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[1] == max(dataset[i]["pixel_values"].shape[1] for i in range(2))
    with lv.apply(model, PDROP):
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_callback_state_restores_from_a_checkpoint(data_dir, tmp_path):
    schedule = lv.StagedSchedule(((0.5, VCC), (0.5, PDROP)))
    model, proc = fresh()
    trainer = trainer_for(
        model,
        proc,
        data_dir,
        tmp_path,
        ReductionCallback(schedule),
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train()
    model, proc = fresh()
    trainer = trainer_for(
        model,
        proc,
        data_dir,
        tmp_path,
        ReductionCallback(None),
        max_steps=4,
        restore_callback_states_from_checkpoint=True,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    restored = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ReductionCallback))
    assert restored.schedule == schedule  # the checkpoint's schedule, not the placeholder's
    assert restored.switches[-1] == (2, 1)


def test_schedule_position_survives_save_and_resume(data_dir, tmp_path):
    schedule = lv.StagedSchedule(((0.5, VCC), (0.5, PDROP)))
    model, proc = fresh()
    first = ReductionCallback(schedule)
    trainer = trainer_for(
        model, proc, data_dir, tmp_path, first, max_steps=8, save_strategy="steps", save_steps=2
    )
    trainer.train()
    state = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["ReductionCallback"]["attributes"]["stage_index"] == 1
    model, proc = fresh()
    resumed = ReductionCallback(schedule)
    trainer = trainer_for(model, proc, data_dir, tmp_path, resumed, max_steps=8)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.switches == [(2, 0), (4, 1)]  # continues in stage 0, switches at the same step


@pytest.mark.parametrize("method", [None, PDROP, VCC], ids=["none", "pyramiddrop", "llavolta"])
def test_overfitting_run_loss_decreases(data_dir, tmp_path, method):
    model, proc = fresh()
    trainer = trainer_for(model, proc, data_dir, tmp_path, ReductionCallback(method), max_steps=16)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def batch_of(proc, data_dir, n=2):
    dataset = LlavaJsonDataset(data_dir / "data.json", proc)
    return collate([dataset[i] for i in range(n)], proc.tokenizer.pad_token_id)


@pytest.mark.parametrize("method", [PDROP, VCC], ids=["pyramiddrop", "llavolta"])
def test_gradients_reach_trainable_parameters_and_checkpointing_agrees(data_dir, method):
    model, proc = fresh()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    batch = batch_of(proc, data_dir)
    grads = {}
    replays_hooks = compat.checkpoint_reruns_hooks(model.model.language_model.layers[0])
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            compat.set_checkpointing(model, True, use_reentrant=False)
        if checkpointing and replays_hooks:  # transformers < 5.23: refused, loudly, at the forward
            with lv.apply(model, method), pytest.raises(lv.CompatError, match="needs transformers >= 5.23"):
                model(**batch)
            compat.set_checkpointing(model, False)
            continue
        with lv.apply(model, method) as applied:
            loss = model(**batch).loss
            loss.backward()
            assert applied.trace.visual_per_layer[0][-1] < applied.trace.visual_per_layer[0][0]
        grads[checkpointing] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
        compat.set_checkpointing(model, False)
    loss, g = grads[False]
    for name in (
        "model.multi_modal_projector.linear_1.weight",
        "model.language_model.layers.4.mlp.down_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ):
        assert g[name].abs().sum() > 0, name
    assert not any("vision_tower" in n for n in g)
    if replays_hooks:
        return
    loss_ckpt, g_ckpt = grads[True]
    torch.testing.assert_close(loss_ckpt, loss)
    assert g.keys() == g_ckpt.keys()
    for name in g:
        torch.testing.assert_close(g_ckpt[name], g[name], atol=1e-5, rtol=1e-4)


def test_pyramiddrop_training_ranks_with_the_token_before_each_answer(data_dir):
    model, proc = build("llava", "eager")
    batch = batch_of(proc, data_dir, n=1)
    labels = batch["labels"][0]
    supervised = labels != -100
    queries = (~supervised[:-1] & supervised[1:]).nonzero()[:, 0]
    assert len(queries) == 2  # one per answer turn
    method = lv.PyramidDrop(layers=(2, 3), keep_ratios=(0.5, 0.25))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[2][0].mean(0)  # layer 2, heads averaged
    visual = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    received = attn[queries][:, visual].mean(0)
    expected = visual[received.topk(8).indices].sort().values
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**batch)
        kept = applied.trace.kept_visual[1][0]
    assert torch.equal(kept, expected)


def test_train_command_runs_and_resumes(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data_dir / "data.json"),
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--method",
        "pyramiddrop:layers=[1,2,3],keep_ratios=[0.5,0.25,0.125]",
        "--no-progress",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["losses"]) == 4
    assert (out / "model.safetensors").exists() and (out / "checkpoint-4").exists()
    from safetensors.torch import load_file

    assert main(argv + ["--resume"]) == 0  # nothing left to train: the weights must be the checkpoint's
    trained, resumed = (
        load_file(out / "checkpoint-4" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[k], resumed[k]) for k in trained)
    resume = (
        argv[: argv.index("--max-steps") + 1] + ["6"] + argv[argv.index("--max-steps") + 2 :] + ["--resume"]
    )
    assert main(resume) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "fastv", "--schedule", "heavy"], "give --method or --schedule, not both"),
        (["--schedule", "medium"], "unknown preset 'medium'"),
        (["--schedule", "half:vcc"], "must start with a fraction"),
        (["--data", "/nonexistent.json"], "cannot be read as a JSON list"),
    ],
)
def test_train_command_bad_arguments(data_dir, tmp_path, capsys, extra, message):
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(data_dir / "data.json"),
        "--output-dir",
        str(tmp_path),
        *extra,
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_samples_without_an_answer_span_are_not_reduced_in_training():
    """PyramidDrop's rule: no instruction token before an answer means no query, so nothing is dropped."""
    model, proc = build("llava")
    from models import PROMPTS, make_inputs

    inputs = make_inputs(proc, PROMPTS[:1])
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100  # an answer span: the last four (text) tokens
    with lv.apply(model, PDROP) as applied:
        loss = model(**inputs, labels=inputs["input_ids"]).loss  # all supervised, visual included
        assert applied.trace.visual_per_layer[0] == [16] * 5
        assert torch.isfinite(loss)
        model(**inputs, labels=labels)  # an answer span after the image: ranked and dropped
        assert applied.trace.visual_per_layer[0][-1] < 16


class _Records(logging.Handler):
    """Collects the messages a logger emits (after its filters)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_run_shorter_than_logging_steps_reports_its_last_loss(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(data_dir, out, "none")
    argv[argv.index("--max-steps") + 1] = "3"
    argv[argv.index("--logging-steps") + 1] = "10"
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["loss_steps"] == [3] and len(summary["losses"]) == 1
    printed = capsys.readouterr().out
    assert "nan" not in printed and f"loss {summary['losses'][0]:.4f} at step 3" in printed


def test_resume_uses_this_runs_logging_steps_and_does_not_list_every_weight(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(data_dir, out, "none")
    argv[argv.index("--max-steps") + 1] = "2"
    argv[argv.index("--logging-steps") + 1] = "10"
    argv[argv.index("--save-steps") + 1] = "2"
    assert main(argv) == 0
    argv[argv.index("--max-steps") + 1] = "5"
    argv[argv.index("--logging-steps") + 1] = "1"
    records = _Records()
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addHandler(records)
    try:
        assert main(argv + ["--resume"]) == 0
    finally:
        trainer_logger.removeHandler(records)
    assert not [m for m in records.messages if "keys in the checkpoint" in m]
    assert not trainer_logger.filters  # the filter is gone after the run
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["logging_steps"] == 1 and summary["loss_steps"] == [2, 3, 4, 5]
    assert "loss" in capsys.readouterr().out


def test_load_weights_restores_every_weight_and_refuses_a_foreign_checkpoint(tmp_path):
    from leanvlm.train.recipe import load_weights

    model, _ = build_preset("tiny", seed=1)
    model.save_pretrained(tmp_path / "same")
    fresh, _ = build_preset("tiny", seed=2)
    loaded = load_weights(fresh, str(tmp_path / "same"))
    assert loaded.training
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    keep = {k: v for k, v in state.items() if "multi_modal_projector" not in k}
    from safetensors.torch import save_file

    (tmp_path / "partial").mkdir()
    model.config.save_pretrained(tmp_path / "partial")
    save_file({k: v.contiguous() for k, v in keep.items()}, tmp_path / "partial" / "model.safetensors")
    with pytest.raises(lv.ConfigError, match="lacks .* of the model's weights"):
        load_weights(fresh, str(tmp_path / "partial"))
    with pytest.raises(lv.ConfigError, match="is not a checkpoint folder"):
        load_weights(fresh, str(tmp_path / "nowhere"))
