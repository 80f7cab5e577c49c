"""The fine-tuning recipe behind ``leanvlm train``: a LLaVA-style model, LLaVA-format data, any
in-LLM method or staged schedule, on one device or under ``accelerate launch`` / DeepSpeed."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

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
        activation_checkpointing=args.gradient_checkpointing,
        bf16=on_gpu and dtype == torch.bfloat16,
        use_cpu=not on_gpu,
        deepspeed=args.deepspeed,
        seed=args.seed,
        disable_tqdm=args.no_progress,
    )
    callback = ReductionCallback(reduction)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=functools.partial(collate, pad_token_id=pad_id),
        callbacks=[callback],
    )
    resume = args.resume
    if resume == "auto":
        resume = any(Path(args.output_dir).glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=resume or None)
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
