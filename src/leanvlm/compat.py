"""Every contact with transformers internals, in one place.

transformers renames internals between releases (5.24 renamed the decoder forwards' cache argument
from ``past_key_values=`` to ``cache=``). The engine, the methods and the adapters reach what they
rely on of transformers' calling conventions, caches and helpers only through this module (what a
model is made of, its modules and their attributes, is the adapters' knowledge). Each entry says which releases it was checked on; when what an
entry relies on is missing, it raises :class:`CompatError` naming the installed version and the
supported range, never a silent fallback.

Supported range: ``FLOOR`` to ``NEWEST_TESTED`` (both run by CI in fresh environments).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch
import transformers

from .errors import CompatError

#: the oldest and newest transformers releases the whole test suite runs on (CI tests both)
FLOOR = "5.18.0"
NEWEST_TESTED = "5.24.0"


def _parse(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = ""
        for ch in part:  # leading digits only: "0rc1" -> 0
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def _next_minor() -> str:
    major, minor = _parse(NEWEST_TESTED)[:2]
    return f"{major}.{minor + 1}"


def installed_version() -> str:
    return transformers.__version__


def version_note() -> str:
    return (
        f"transformers {installed_version()} is installed; leanvlm supports {FLOOR} to {NEWEST_TESTED} "
        f"(pip install 'transformers>={FLOOR},<{_next_minor()}')"
    )


def in_supported_range(version: str | None = None) -> bool:
    """FLOOR <= version, and no newer minor release than NEWEST_TESTED (its patch releases are in)."""
    v = _parse(version or installed_version())
    return _parse(FLOOR) <= v and v[:2] <= _parse(NEWEST_TESTED)[:2]


def fail(what: str) -> CompatError:
    """The error for a transformers internal that is not where leanvlm expects it."""
    return CompatError(f"{what}. {version_note()}")


@functools.cache
def warn_if_untested() -> None:
    """Once per process: a release outside the tested range may have moved what the engine relies on.
    Every such contact still checks itself and raises rather than mis-compute."""
    if not in_supported_range():
        warnings.warn(
            f"leanvlm has not been tested with transformers {installed_version()}: {version_note()}",
            stacklevel=3,
        )


# --- KV caches ---------------------------------------------------------------------------------------
# 5.18-5.23: model and decoder-layer forwards take ``past_key_values=``; 5.24: ``cache=`` (the old name
# a deprecated alias). The cache is therefore found by its type among a call's arguments, and the
# names are only a first guess.
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer  # noqa: E402  (5.18-5.24)

CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


def is_cache(value) -> bool:
    return isinstance(value, Cache)


def find_cache(args: tuple, kwargs: dict):
    """The KV cache among a forward call's arguments (by type, whatever its keyword), or None."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if is_cache(value):
            return value
    for value in (*kwargs.values(), *args):
        if is_cache(value):
            return value
    return None


def cache_length(cache) -> int:
    """Tokens cached by layer 0 (what transformers reads for positions and masks), as an int."""
    return int(cache.get_seq_length())


def layer_lengths(cache) -> list[int]:
    """Tokens cached per layer (5.18-5.24: ``cache.layers[i].get_seq_length()``)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise fail(f"{type(cache).__name__} has no per-layer list (.layers)")
    return [int(layer.get_seq_length()) for layer in layers]


def layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a dynamic cache (5.18-5.24: ``layer.keys`` / ``layer.values``)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_write(cache, keys: torch.Tensor, values: torch.Tensor, layer_idx: int):
    """Append ``keys`` / ``values`` [B, H_kv, n, Dh] (RoPE applied) to layer ``layer_idx`` of ``cache``, as
    a decoder layer's attention does (5.18-5.24: ``cache.update(k, v, layer_idx)``); returns the layer's
    whole (keys, values)."""
    update = getattr(cache, "update", None)
    if update is None:
        raise fail(f"{type(cache).__name__} has no update(keys, values, layer_idx)")
    return update(keys, values, layer_idx)


def reducible_cache_problem(cache) -> str | None:
    """Why ``cache`` cannot hold layers of different lengths (None when it can): only a DynamicCache of
    plain full-attention DynamicLayers lets every layer keep its own length."""
    bad = [type(layer).__name__ for layer in getattr(cache, "layers", []) if type(layer) is not DynamicLayer]
    if isinstance(cache, DynamicCache) and not bad:
        return None
    kinds = f" with {', '.join(sorted(set(bad)))}" if bad else ""
    return f"{type(cache).__name__}{kinds}"


def output_cache(output):
    """The cache a model output carries (5.18-5.23: ``.past_key_values``; 5.24: ``.cache``), or None."""
    if isinstance(output, dict):
        for name in CACHE_KWARGS:
            if is_cache(output.get(name)):
                return output[name]
    return None


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(module) -> str:
    """The keyword ``module.forward`` takes its KV cache under (for callers that pass one)."""
    params = _forward_parameters(type(module))
    for name in CACHE_KWARGS[:2]:
        if name in params:
            return name
    raise fail(f"{type(module).__name__}.forward takes no KV cache argument (looked for {CACHE_KWARGS[:2]})")


# --- decoder layers ------------------------------------------------------------------------------------
# 5.18-5.24: the text model's loop calls ``layer(hidden_states, attention_mask=..., position_ids=...,
# <cache>=..., use_cache=..., position_embeddings=(cos, sin), **kwargs)``; the engine edits the
# hidden states, the mask, the positions and the rotary tables.
LAYER_KWARGS = ("attention_mask", "position_embeddings")


def check_decoder_layer(layer) -> None:
    """Raise unless the decoder layer's forward takes what the engine hands it."""
    params = _forward_parameters(type(layer))
    has_var_kw = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(type(layer).forward).parameters.values()
    )
    missing = [n for n in ("hidden_states", *LAYER_KWARGS) if n not in params]
    if missing and not has_var_kw:
        raise fail(f"{type(layer).__name__}.forward does not take {', '.join(missing)}")
    if "hidden_states" not in params:
        raise fail(f"{type(layer).__name__}.forward does not take hidden_states first")


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise fail("a decoder layer was called without hidden_states")
    return hidden


def set_layer_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def stock_decoding(model, generation_config):
    """transformers' own decoding loop for ``generation_config``'s mode, bound to ``model`` (5.18-5.24:
    greedy and sampling run ``GenerationMixin._sample``; called like a ``custom_generate`` callable)."""
    from transformers.generation.utils import GENERATION_MODES_MAPPING, GenerationMode

    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise fail(
            f"a leanvlm decoding entry supports greedy search and sampling; this call asks for {mode.value}"
        )
    loop = getattr(type(model), GENERATION_MODES_MAPPING[mode], None)
    if loop is None:
        raise fail(f"{type(model).__name__} has no {GENERATION_MODES_MAPPING[mode]} decoding loop")
    return functools.partial(loop, model)


def layer_output_hidden(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (5.18-5.24: the tensor itself; older: a tuple's first)."""
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor):
        raise fail(f"a decoder layer returned {type(output).__name__}, not hidden states")
    return hidden


def layer_output(hidden: torch.Tensor):
    """What a decoder layer's forward returns for ``hidden`` (5.18-5.24: the tensor itself)."""
    return hidden


def layer_rotary(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables a decoder layer was handed (5.18-5.24: ``position_embeddings=``)."""
    rope = kwargs.get("position_embeddings")
    if not (isinstance(rope, tuple) and len(rope) == 2):
        raise fail("a decoder layer was called without position_embeddings=(cos, sin)")
    if rope[0].dim() != 3:  # before 5.17 Qwen-VL handed its layers per-section M-RoPE tables [3, B, N, D]
        raise fail(f"a decoder layer got rotary tables of shape {tuple(rope[0].shape)}, not [B, N, head_dim]")
    return rope


def mask_kind(mask) -> str:
    """How a per-layer attention mask is encoded: "none", "padding" (2-D; flash attention), "bool"
    (4-D, True = attend; sdpa) or "additive" (4-D float, 0 or the dtype's minimum; eager). Any other
    encoding (flex attention's BlockMask, a per-layer-type dict) raises."""
    if mask is None:
        return "none"
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 2:
            return "padding"
        if mask.dim() == 4:
            return "bool" if mask.dtype == torch.bool else "additive"
    raise fail(
        f"a decoder layer got an attention mask of a form leanvlm does not know ({type(mask).__name__})"
    )


def mrope_rows(position_ids):
    """The three (t, h, w) rows of Qwen-VL position ids; 5.x may prepend a text-position row ([4, B, N])."""
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids


def rotary(text_model, hidden: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) for ``position_ids`` as the text model computes them (5.18-5.24: ``rotary_emb``)."""
    emb = getattr(text_model, "rotary_emb", None)
    if emb is None:
        raise fail(f"{type(text_model).__name__} has no rotary_emb")
    return emb(hidden, position_ids=position_ids)


def attn_implementation(config) -> str:
    """The attention implementation a config selects (5.18-5.24: ``config._attn_implementation``)."""
    return getattr(config, "_attn_implementation", None) or "eager"


def set_attn_implementation(model, impl: str) -> None:
    """Set the LLM's attention kernel, keeping sdpa in the vision tower (5.18-5.24: dict form)."""
    model.set_attn_implementation({"": impl, "text_config": impl, "vision_config": "sdpa"})


def causal_lm_loss(module, logits, labels=None, shift_labels=None, **kwargs):
    """The model's own causal-LM loss (5.18-5.24: ``module.loss_function``; shift_labels take precedence)."""
    fn = getattr(module, "loss_function", None)
    if fn is None:
        raise fail(f"{type(module).__name__} has no loss_function")
    if shift_labels is not None:
        kwargs["shift_labels"] = shift_labels
    return fn(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)


def anyres_canvas(size: tuple[int, int], grid_pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT: the (height, width) canvas an image of ``size`` is fitted to (5.18-5.24)."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(list(size), grid_pinpoints))


def anyres_crops(image_size, grid_pinpoints, tile: int) -> int:
    """LLaVA-NeXT: crops (base view + tiles) the vision tower runs for one image (5.18-5.24)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(image_size=image_size, grid_pinpoints=grid_pinpoints, patch_size=tile)


# --- training --------------------------------------------------------------------------------------
# 5.18-5.22: ``gradient_checkpointing`` (TrainingArguments field, ``model.gradient_checkpointing_enable``);
# 5.23-5.24: renamed ``activation_checkpointing`` (the old names warn and are to go in 6.0).
def checkpointing_argument() -> str:
    """The TrainingArguments field that turns activation (gradient) checkpointing on."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in names:
            return name
    raise fail("TrainingArguments has neither activation_checkpointing nor gradient_checkpointing")


def set_checkpointing(model, enabled: bool, use_reentrant: bool = False) -> None:
    """Turn activation checkpointing on or off on a transformers model."""
    for prefix in ("activation", "gradient"):
        if hasattr(model, f"{prefix}_checkpointing_enable"):
            if enabled:
                kwargs = {f"{prefix}_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
                getattr(model, f"{prefix}_checkpointing_enable")(**kwargs)
            else:
                getattr(model, f"{prefix}_checkpointing_disable")()
            return
    raise fail(
        f"{type(model).__name__} has no activation_checkpointing_enable / gradient_checkpointing_enable"
    )


def checkpoint_reruns_hooks(layer) -> bool:
    """Whether activation checkpointing, when on for ``layer``, re-runs the layer's forward hooks in the
    backward pass. 5.18-5.22 checkpoint ``__call__`` (hooks included: the replay would see none of the
    engine's edits); 5.23-5.24 checkpoint ``forward``, inside the hooks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(layer, GradientCheckpointingLayer) and "__call__" in GradientCheckpointingLayer.__dict__


def checkpointing_active(layer) -> bool:
    return (
        bool(getattr(layer, "gradient_checkpointing", False)) and layer.training and torch.is_grad_enabled()
    )


# 5.18-5.24: a CLIP-style vision encoder layer computes ``self_attn(layer_norm1(x))`` with separate
# q_proj / k_proj (num_heads, head_dim, scale on the attention module) and no positional terms inside.
def vision_query_key(layer, hidden: torch.Tensor, query_rows: int = 1):
    """(q [B, H, query_rows, Dh] of the first ``query_rows`` tokens, k [B, H, N, Dh] of every token,
    scale) as the CLIP-style vision encoder ``layer`` computes them from its input ``hidden`` [B, N, D]."""
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "num_heads", "head_dim", "scale")
    if attn is None or not hasattr(layer, "layer_norm1") or not all(hasattr(attn, n) for n in needed):
        raise fail(
            f"{type(layer).__name__} is not a CLIP-style encoder layer (layer_norm1, self_attn with "
            "q_proj / k_proj / num_heads / head_dim / scale)"
        )
    b, n, _ = hidden.shape
    x = layer.layer_norm1(hidden)
    q = attn.q_proj(x[:, :query_rows]).view(b, query_rows, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    return q, k, attn.scale


def image_text_to_text_class(model_type: str) -> str:
    """The class ``AutoModelForImageTextToText`` builds for ``model_type`` ("" when none; 5.18-5.24:
    ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``)."""
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", None)
    if mapping is None:
        raise fail("transformers.models.auto.modeling_auto has no MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
    return mapping.get(model_type, "")


@dataclasses.dataclass(frozen=True)
class ClipLayerParts:
    """A CLIP-style vision encoder layer taken apart (5.18-5.24: ``layer_norm1``, ``self_attn`` with
    q/k/v/out projections, ``layer_norm2``, ``mlp``): x + out(attn(norm1(x))), then h + mlp(norm2(h))."""

    layer_norm1: torch.nn.Module
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    out_proj: torch.nn.Module
    layer_norm2: torch.nn.Module
    mlp: torch.nn.Module
    num_heads: int
    head_dim: int
    scale: float


def clip_layer_parts(layer) -> ClipLayerParts:
    """The parts of a CLIP-style vision encoder layer, for computing it by hand; raises naming what is
    missing."""
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")
    missing = [n for n in ("layer_norm1", "layer_norm2", "mlp") if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in needed if attn is None or not hasattr(attn, n)]
    if missing:
        raise fail(
            f"{type(layer).__name__} is not a CLIP-style encoder layer: it has no {', '.join(missing)}"
        )
    return ClipLayerParts(
        layer.layer_norm1,
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.out_proj,
        layer.layer_norm2,
        layer.mlp,
        attn.num_heads,
        attn.head_dim,
        attn.scale,
    )


# 5.18-5.24: generate() may hand the pixels to the first forward, which runs the vision tower, or encode
# them before its loop (``get_image_features``) and pass ``mm_encoder_outputs`` instead (then repeated for
# beams / several returned sequences; 5.18 repeats each image rather than each sample's images).
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def runs_vision_tower(kwargs: dict) -> bool:
    """Whether a VLM forward with these arguments runs its vision tower (it was handed pixels)."""
    return any(kwargs.get(k) is not None for k in PIXEL_KEYS)


# 5.18-5.24: a Qwen-VL vision block computes ``attn(norm1(x), cu_seqlens=..., position_embeddings=(cos,
# sin))``; ``attn.qkv`` is one fused projection (q, k, v per head) and the rotary function is
# ``apply_rotary_pos_emb_vision`` of the block's modeling module. Qwen2.5-VL's blocks see the patches
# regrouped into attention windows (``transformers.vision_utils.get_vision_window_index``); its merger's
# output is put back into raster order.
def qwen_vision_query_key(block, hidden: torch.Tensor, kwargs: dict):
    """(q, k with RoPE [H, P, Dh], k without RoPE [H, P, Dh], scaling, cu_seqlens) as the Qwen-VL vision
    ``block`` computes them from its input ``hidden`` [P, D] and call arguments."""
    import sys

    attn = getattr(block, "attn", None)
    rotate = getattr(sys.modules[type(block).__module__], "apply_rotary_pos_emb_vision", None)
    if (
        attn is None
        or not hasattr(block, "norm1")
        or not all(hasattr(attn, n) for n in ("qkv", "num_heads", "scaling"))
        or rotate is None
    ):
        raise fail(
            f"{type(block).__name__} is not a Qwen-VL vision block (norm1, attn.qkv / num_heads / scaling)"
        )
    rope, cu = kwargs.get("position_embeddings"), kwargs.get("cu_seqlens")
    if rope is None or cu is None:
        raise fail(f"{type(block).__name__} was called without position_embeddings / cu_seqlens")
    n = hidden.shape[0]
    q, k, _ = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q_rot, k_rot = rotate(q, k, *rope)
    return q_rot.transpose(0, 1), k_rot.transpose(0, 1), k.transpose(0, 1), attn.scaling, cu


def qwen_window_index(visual, grid_thw: torch.Tensor) -> torch.Tensor | None:
    """Qwen2.5-VL: for each merged group of the blocks' patch order, its index in raster order (None for
    a tower without attention windows: Qwen2-VL)."""
    if not hasattr(visual, "window_size") or not hasattr(visual, "fullatt_block_indexes"):
        return None
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return index


def has_cls_token(tower) -> bool:
    """Whether a CLIP-style vision tower prepends a CLS token (CLIP: ``embeddings.class_embedding``;
    SigLIP has none)."""
    inner = getattr(tower, "vision_model", tower)
    return hasattr(getattr(inner, "embeddings", None), "class_embedding")
