"""The fine-tuning recipe behind ``leanvlm train``: a LLaVA-style model, LLaVA-format data, any
in-LLM method or staged schedule, on one device or under ``accelerate launch`` / DeepSpeed."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from pathlib import Path

import torch

from .. import compat
from ..errors import ConfigError
from ..methods.spec import parse_method, resolve_method, split_top_level
from ..modules import ATTR, load_modules, prepare, save_modules
from ..registry import find_adapter
from .schedule import StagedSchedule


def parse_schedule(text: str, num_layers: int | None = None) -> StagedSchedule:
    """``"4stage"`` (a preset) or ``"0.5:vcc:layer=2,stride=8;0.5:none"`` (fraction:method spec; ...); with
    ``num_layers``, each stage's method takes its defaults for that depth (:func:`resolve_method`)."""
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
        stages.append((value, parse_method(spec) if num_layers is None else resolve_method(spec, num_layers)))
    return StagedSchedule(tuple(stages))


def freeze(model, part: str) -> None:
    """``part``: "vision" (freeze the vision tower: LLaVA's fine-tuning stage), "none"."""
    if part == "vision":
        tower = getattr(model.model, "vision_tower", None) or getattr(model.model, "visual", None)
        if tower is None:
            raise ConfigError(f"--freeze vision: {type(model).__name__} has no vision_tower / visual module")
        for p in tower.parameters():
            p.requires_grad_(False)


PARTS = ("all", "modules", "modules+projector")


def projector_of(model):
    """The module mapping vision features into the LLM (the model's adapter knows it)."""
    from ..errors import UnsupportedModelError
    from ..registry import find_adapter

    try:
        return find_adapter(model).projector
    except UnsupportedModelError as err:
        raise ConfigError(f"--train-parts modules+projector: {err}") from None


def select_parts(model, parts: str, methods) -> list:
    """Leave ``requires_grad`` on only the ``parts`` that train ("all": what ``--freeze`` left; "modules":
    the methods' own modules; "modules+projector": and the projector); returns the modules' parameters."""
    if parts not in PARTS:
        raise ConfigError(f"--train-parts={parts!r} is not one of {', '.join(PARTS)}")
    registry = model._modules.get(ATTR)
    own = [p for m in methods for p in registry[m.module_key()].parameters()] if registry is not None else []
    if parts != "all":
        if not methods:
            raise ConfigError(
                f"--train-parts={parts}: the method has no modules of its own to train (e.g. --method proxyv)"
            )
        keep = {id(p) for p in own}
        if parts == "modules+projector":
            keep |= {id(p) for p in projector_of(model).parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return own


def load_weights(model, checkpoint: str):
    """``model`` with the weights of ``checkpoint`` (a folder written by ``save_pretrained``); every
    weight of the model must be in it."""
    if not Path(checkpoint).is_dir():
        raise ConfigError(f"--resume {checkpoint!r} is not a checkpoint folder")
    loaded, info = type(model).from_pretrained(
        checkpoint, dtype=next(model.parameters()).dtype, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(
            f"--resume {checkpoint!r}: the checkpoint lacks {len(missing)} of the model's weights ({shown}); "
            "is it a checkpoint of this model?"
        )
    loaded.train()
    return loaded


class _TrainerReload(logging.Filter):
    """Drops the Trainer's list of the keys its own reload of a checkpoint's weights missed. Resuming,
    :func:`load_weights` has already restored every weight through ``from_pretrained``, which maps the
    checkpoint's key names onto the model's; the Trainer's ``load_state_dict(strict=False)`` does not,
    so it names every weight of a VLM checkpoint as missing (tens of kilobytes) and loads none of them."""

    PREFIXES = (
        "There were missing keys in the checkpoint model loaded",
        "There were unexpected keys in the checkpoint model loaded",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextlib.contextmanager
def resumed_weights_reload(resume):
    """While the Trainer resumes from ``resume`` (weights already loaded by :func:`load_weights`): no
    report of the keys its second load misses. Does nothing when not resuming."""
    if not resume:
        yield
        return
    trainer_logger = logging.getLogger("transformers.trainer")
    quiet = _TrainerReload()
    trainer_logger.addFilter(quiet)
    try:
        yield
    finally:
        trainer_logger.removeFilter(quiet)


def logging_callback():
    """A Trainer callback for the recipe's logging: the intervals of this run's arguments also when resuming
    (the Trainer takes ``logging_steps`` / ``save_steps`` from the checkpoint's ``trainer_state.json``), and
    the loss logged at the last step, so that a run shorter than ``--logging-steps`` logs one too."""
    from transformers import TrainerCallback

    class LoggingIntervals(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            state.compute_steps(args, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LoggingIntervals()


def modules_optimizer(model, own: list, args):
    """AdamW with the methods' modules at ``--modules-lr`` and every other trained parameter at ``--lr``
    (the reference recipes' separate rate for new modules); the Trainer schedules both alike."""
    if args.deepspeed:
        raise ConfigError(
            "--modules-lr is not supported with --deepspeed (DeepSpeed builds its own optimizer)"
        )
    if not own:
        raise ConfigError("--modules-lr: the method has no modules of its own (e.g. --method proxyv)")
    if args.modules_lr <= 0:
        raise ConfigError(f"--modules-lr={args.modules_lr} must be > 0")
    mine = {id(p) for p in own}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
    groups = [{"params": [p for p in own if p.requires_grad], "lr": args.modules_lr}]
    if rest:
        groups.append({"params": rest, "lr": args.lr})
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)


def trained_digest(model) -> str:
    """sha256 of every trainable parameter (by name), to compare processes after data-parallel training."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def gather(value) -> list:
    """``value`` from every process (a one-item list outside distributed training)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def run(args) -> dict:
    from transformers import Trainer, TrainingArguments

    from ..loading import attach_saved_modules, check_device, load_model, resolve_dtype
    from .callback import ReductionCallback
    from .data import LlavaJsonDataset, collate

    check_device(args.device)
    if args.method and args.schedule:
        raise ConfigError("give --method or --schedule, not both")
    reduction = parse_schedule(args.schedule) if args.schedule else parse_method(args.method or "none")
    dtype = resolve_dtype(args.dtype, args.device)
    args.dtype = str(dtype).replace("torch.", "")
    on_gpu = torch.device(args.device).type == "cuda"
    # load on the CPU: the Trainer (or accelerate / DeepSpeed) places the model on each process's device
    model, processor, label = load_model(args.model, args.preset, dtype=dtype, device="cpu", attn=args.attn)
    depth = find_adapter(model).num_layers  # a method's defaults follow the model's depth
    reduction = (
        parse_schedule(args.schedule, depth)
        if args.schedule
        else resolve_method(args.method or "none", depth)
    )
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
    trainable = callback.trainable_methods()
    if resume and trainable:
        load_modules(model, resume, *trainable)  # the base weights' loader does not know them
    elif trainable and args.model:
        attach_saved_modules(model, args.model, trainable)  # a run's output folder: a later stage goes on
    prepare(model, *trainable)  # before the optimizer (the callback would attach them at the Trainer's init)
    own = select_parts(model, getattr(args, "train_parts", "all"), trainable)
    optimizers = (None, None)
    if getattr(args, "modules_lr", None) is not None:
        optimizers = (modules_optimizer(model, own, args), None)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=functools.partial(collate, pad_token_id=pad_id),
        callbacks=[callback],
        optimizers=optimizers,
    )
    trainer.add_callback(logging_callback())
    try:
        with resumed_weights_reload(resume):
            result = trainer.train(resume_from_checkpoint=resume or None)
    finally:
        callback._deactivate()  # also when training fails: leave the model without hooks
    # the base checkpoint stays a plain transformers one; trainable parts are written beside it
    registry = model._modules.pop(ATTR, None)
    try:
        trainer.save_model(args.output_dir)
    finally:
        if registry is not None:
            model.add_module(ATTR, registry)
    if trainer.is_world_process_zero():
        save_modules(model, args.output_dir)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(args.output_dir)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "world_size": training_args.world_size,
        # one digest of the trained weights per process: equal when data parallelism kept them in sync
        "weights_digest": gather(trained_digest(model)),
        "main_process": trainer.is_world_process_zero(),
        "model": label,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "losses": [h["loss"] for h in logged],
        "loss_steps": [h.get("step") for h in logged],  # the step each of "losses" was logged at
        "logging_steps": trainer.state.logging_steps,
        "stage_switches": callback.switches,
        "output_dir": args.output_dir,
    }
