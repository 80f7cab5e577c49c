"""The fine-tuning recipe behind ``leanvlm train``: a LLaVA-style model, LLaVA-format data, any
in-LLM method or staged schedule, on one device or under ``accelerate launch`` / DeepSpeed."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from .. import compat
from ..errors import ConfigError
from ..methods.spec import parse_method, split_top_level
from .schedule import StagedSchedule


def parse_schedule(text: str) -> StagedSchedule:
    """``"4stage"`` (a preset) or ``"0.5:vcc:layer=2,stride=8;0.5:none"`` (fraction:method spec; ...)."""
    if ":" not in text:
        return StagedSchedule.preset(text)
    stages = []
    for item in split_top_level(text, ";"):
        fraction, _, spec = item.partition(":")
        try:
            value = float(fraction)
        except ValueError:
            raise ConfigError(
                f"--schedule stage {item!r} must start with a fraction, e.g. '0.25:vcc:stride=8'"
            ) from None
        stages.append((value, parse_method(spec)))
    return StagedSchedule(tuple(stages))


def freeze(model, part: str) -> None:
    """``part``: "vision" (freeze the vision tower: LLaVA's fine-tuning stage), "none"."""
    if part == "vision":
        tower = getattr(model.model, "vision_tower", None) or getattr(model.model, "visual", None)
        if tower is None:
            raise ConfigError(f"--freeze vision: {type(model).__name__} has no vision_tower / visual module")
        for p in tower.parameters():
            p.requires_grad_(False)


def load_weights(model, checkpoint: str):
    """``model`` with the weights of ``checkpoint`` (a folder written by ``save_pretrained``)."""
    if not Path(checkpoint).is_dir():
        raise ConfigError(f"--resume {checkpoint!r} is not a checkpoint folder")
    loaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    loaded.train()
    return loaded


def run(args) -> dict:
    from transformers import Trainer, TrainingArguments

    from ..cli.common import check_device, load_model, resolve_dtype
    from .callback import ReductionCallback
    from .data import LlavaJsonDataset, collate

    check_device(args.device)
    if args.method and args.schedule:
        raise ConfigError("give --method or --schedule, not both")
    reduction = parse_schedule(args.schedule) if args.schedule else parse_method(args.method or "none")
    dtype = resolve_dtype(args)
    on_gpu = torch.device(args.device).type == "cuda"
    # load on the CPU: the Trainer (or accelerate / DeepSpeed) places the model on each process's device
    model, processor, label = load_model(argparse.Namespace(**{**vars(args), "device": "cpu"}), dtype)
    model.train()
    freeze(model, args.freeze)
    dataset = LlavaJsonDataset(args.data, processor, args.image_folder, max_length=args.max_length)
    pad_id = getattr(processor, "tokenizer", processor).pad_token_id
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **{compat.checkpointing_argument(): args.gradient_checkpointing},
        bf16=on_gpu and dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        deepspeed=args.deepspeed,
        seed=args.seed,
        disable_tqdm=args.no_progress,
    )
    resume = args.resume
    if resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if resume:
        # the Trainer restores optimizer, scheduler and step from the checkpoint, but loads its weights with
        # load_state_dict(strict=False), which silently skips VLM checkpoints saved under legacy key names:
        # load the weights through from_pretrained instead
        model = load_weights(model, resume)
        freeze(model, args.freeze)
    callback = ReductionCallback(reduction)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=functools.partial(collate, pad_token_id=pad_id),
        callbacks=[callback],
    )
    try:
        result = trainer.train(resume_from_checkpoint=resume or None)
    finally:
        callback._deactivate()  # also when training fails: leave the model without hooks
    trainer.save_model(args.output_dir)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(args.output_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "model": label,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "losses": losses,
        "stage_switches": callback.switches,
        "output_dir": args.output_dir,
    }
