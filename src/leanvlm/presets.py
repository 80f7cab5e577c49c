"""Models built from configs (random weights, no download) and their processors.

Used by the demo, the bench and the tests. Real checkpoints are loaded with :func:`load_pretrained`.
"""

from __future__ import annotations

import warnings

import torch

from .loading import chat_inputs, chat_prompt, load_pretrained  # noqa: F401  (re-exported)

SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<video>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
]

_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A cat sitting on a red chair next to a window.",
    "Describe the picture in detail. There is a dog, a ball, two trees and a blue sky with clouds.",
    "How many people are in the photo? Three people are standing near the river at sunset.",
    "What color is the car? The car is white and parked in front of a small yellow house.",
    "Read the text on the sign. The sign says open from nine to five every day of the week.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( )",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE tokenizer trained on a few sentences (milliseconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def llava_config(
    *,
    vocab_size: int,
    image_token_id: int,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_intermediate: int | None = None,
    vision_layers: int = 2,
    vision_heads: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    max_position_embeddings: int = 4096,
    pad_token_id: int | None = None,
):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def qwen_vl_config(
    family: str,
    *,
    vocab_size: int,
    tokenizer,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_intermediate: int = 64,
    vision_heads: int = 4,
    mrope_section: tuple[int, int, int] | None = None,
    max_position_embeddings: int = 32768,
    **_ignored,
):
    """Qwen2-VL (``family="qwen2-vl"``) or Qwen2.5-VL (``"qwen2.5-vl"``) config."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = hidden // heads
    if mrope_section is None:
        t = head_dim // 2 // 4
        mrope_section = (t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=vision_heads)
    if family == "qwen2-vl":
        vision = dict(
            depth=vision_depth,
            embed_dim=vision_hidden,
            hidden_size=hidden,
            mlp_ratio=vision_intermediate // vision_hidden,
            **common,
        )
        cls = Qwen2VLConfig
    else:
        last = vision_depth - 1
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            out_hidden_size=hidden,
            window_size=112,
            fullatt_block_indexes=sorted({last, *range(7, vision_depth, 8)}),
            **common,
        )
        cls = Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    return cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def llava_next_config(*, vocab_size: int, tokenizer, image_size: int = 56, pinpoints=None, **shape):
    from transformers import LlavaNextConfig

    base = llava_config(
        vocab_size=vocab_size,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_size=image_size,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    s = image_size
    return LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=base.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints or [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
    )


_CLIP_L_336 = dict(
    vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16, image_size=336
)
_QWEN25_VIT = dict(vision_depth=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16)

#: Model shapes with random weights: ``family`` picks the model class, the rest is its shape.
#: ``vocab_size`` None means the built-in tokenizer's size.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        family="llava", num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, image_size=56
    ),
    "tiny-llava-next": dict(
        family="llava-next", num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, image_size=56
    ),
    "tiny-qwen2-vl": dict(family="qwen2-vl", num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2),
    "tiny-qwen2.5-vl": dict(
        family="qwen2.5-vl", num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2
    ),
    "demo": dict(
        family="llava",
        num_layers=8,
        hidden=256,
        intermediate=688,
        heads=8,
        kv_heads=8,
        image_size=336,
        vision_hidden=64,
        vision_layers=2,  # features from layer -2: VisionZip reads the layer before
    ),
    "bench-cpu": dict(
        family="llava",
        num_layers=32,
        hidden=256,
        intermediate=688,
        heads=8,
        kv_heads=8,
        image_size=336,
        vision_hidden=64,
        vision_layers=2,  # the features are layer -2's output: one layer for VisionZip to read
        vocab_size=32064,
    ),
    "llava-1.5-7b": dict(
        family="llava",
        num_layers=32,
        hidden=4096,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        vocab_size=32064,
        **_CLIP_L_336,
    ),
    "llava-1.5-13b": dict(
        family="llava",
        num_layers=40,
        hidden=5120,
        intermediate=13824,
        heads=40,
        kv_heads=40,
        vocab_size=32064,
        **_CLIP_L_336,
    ),
    "llava-next-7b": dict(
        family="llava-next",
        num_layers=32,
        hidden=4096,
        intermediate=11008,
        heads=32,
        kv_heads=32,
        vocab_size=32064,
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        **_CLIP_L_336,
    ),
    "qwen2.5-vl-7b": dict(
        family="qwen2.5-vl",
        num_layers=28,
        hidden=3584,
        intermediate=18944,
        heads=28,
        kv_heads=4,
        vocab_size=152064,
        mrope_section=(16, 24, 24),
        image_size=448,
        **_QWEN25_VIT,
    ),
}
# bench-cpu with LLaVA-1.5's tower depth (features from layer 23 of 24), for methods inside the tower
PRESETS["bench-cpu-tower24"] = {**PRESETS["bench-cpu"], "vision_layers": 24}

PRESET_HELP = {
    "tiny": "4-layer LLaVA, 16 visual tokens (tests)",
    "tiny-llava-next": "4-layer LLaVA-NeXT (tests)",
    "tiny-qwen2-vl": "4-layer Qwen2-VL (tests)",
    "tiny-qwen2.5-vl": "4-layer Qwen2.5-VL (tests)",
    "demo": "8-layer hidden-256 LLaVA with LLaVA-1.5's 576 visual tokens",
    "bench-cpu": "32-layer hidden-256 LLaVA with 576 visual tokens (default bench model)",
    "bench-cpu-tower24": "bench-cpu with a 24-layer vision tower, as LLaVA-1.5's (for CrossGET)",
    "llava-1.5-7b": "LLaVA-1.5-7B shape (Vicuna-7B + CLIP ViT-L/14-336)",
    "llava-1.5-13b": "LLaVA-1.5-13B shape (Vicuna-13B + CLIP ViT-L/14-336)",
    "llava-next-7b": "LLaVA-NeXT-7B shape (Vicuna-7B + CLIP ViT-L/14-336, AnyRes up to 672x672)",
    "qwen2.5-vl-7b": "Qwen2.5-VL-7B shape (28 layers, GQA 28/4, 32-layer window-attention ViT)",
}

_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava-next": "LlavaNextForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
}


def _preset_spec(name: str, overrides: dict) -> dict:
    from .errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


def preset_config(name: str, tokenizer=None, **overrides):
    """The config of preset ``name`` (no weights), using the built-in tokenizer's special-token ids."""
    spec = _preset_spec(name, overrides)
    family = spec.pop("family")
    tokenizer = tokenizer or build_tokenizer()
    vocab = spec.pop("vocab_size", None) or len(tokenizer)
    if family == "llava":
        return llava_config(
            vocab_size=vocab,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id,
            **spec,
        )
    if family == "llava-next":
        return llava_next_config(vocab_size=vocab, tokenizer=tokenizer, **spec)
    return qwen_vl_config(family, vocab_size=vocab, tokenizer=tokenizer, **spec)


def preset_processor(name: str, tokenizer, **overrides):
    """A processor for preset ``name`` built offline (a stand-in for the Qwen processors, see qwen_inputs)."""
    spec = _preset_spec(name, overrides)
    family = spec["family"]
    if family == "llava":
        return llava_processor(tokenizer, image_size=spec.get("image_size", 56))
    if family == "llava-next":
        return llava_next_processor(tokenizer, preset_config(name, tokenizer, **overrides))
    from transformers import Qwen2VLImageProcessor

    from .qwen_inputs import QwenVLInputs

    side = spec.get("image_size", 112)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = Qwen2VLImageProcessor(
            min_pixels=56 * 56, max_pixels=side * side, patch_size=14, merge_size=2, temporal_patch_size=2
        )
    return QwenVLInputs(tokenizer, image_processor)


def build_preset(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides,
):
    """A model of preset ``name`` with random weights, created directly on ``device`` (no full-size CPU
    copy), and a processor for it."""
    import transformers

    tokenizer = build_tokenizer()
    cfg = preset_config(name, tokenizer, **overrides)
    model_cls = getattr(transformers, _MODEL_CLASSES[_preset_spec(name, overrides)["family"]])
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    set_attention(model, attn_implementation)
    model.eval()
    return model, preset_processor(name, tokenizer, **overrides)


def preset_model_class(name: str) -> str:
    return _MODEL_CLASSES[_preset_spec(name, {})["family"]]


def llava_processor(tokenizer, image_size: int = 56, patch_size: int = 14):
    from transformers import CLIPImageProcessor, LlavaProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_next_processor(tokenizer, config):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    v = config.vision_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": v.image_size},
            crop_size={"height": v.image_size, "width": v.image_size},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=v.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llava(
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **shape,
):
    """A LLaVA model with random weights (the ``tiny`` preset, with any shape overrides) and a processor.

    The default has 16 visual tokens per image; ``image_size=336`` gives LLaVA-1.5's 576.
    """
    return build_preset(
        "tiny", attn_implementation=attn_implementation, dtype=dtype, device=device, seed=seed, **shape
    )


def set_attention(model, impl: str) -> None:
    """Set the LLM's attention kernel; the vision tower keeps sdpa (it has no KV cache or drops)."""
    from . import compat

    compat.set_attn_implementation(model, impl)


def demo_image(size: int = 56, seed: int = 0):
    """A synthetic RGB image (smooth gradients plus a few blocks), so demos need no files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    img = np.stack([x, y, 1 - x * y], -1)
    for _ in range(4):
        r0, c0 = rng.integers(0, size * 3 // 4, 2)
        img[r0 : r0 + size // 4, c0 : c0 + size // 4] = rng.random(3)
    return Image.fromarray((img * 255).astype("uint8"))


def demo_llava(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, device="cpu", **shape):
    """The demo model: LLaVA-1.5's 576 visual tokens (336 px, patch 14) on a small 8-layer LLM."""
    return build_preset("demo", attn_implementation=attn_implementation, dtype=dtype, device=device, **shape)
