import dataclasses

from ..errors import UnsupportedModelError
from ..flops import ModelShape
from ..registry import register_adapter
from .base import Adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes. Each image is a base view plus
    high-resolution tiles, unpadded, with an ``image_newline`` token closing every row of the tile
    grid, so the number of visual tokens varies per image and per sample.

    All placeholder positions count as visual tokens, newline tokens included: they can be dropped
    like any other, as PyramidDrop's reference code does on LLaVA-NeXT."""

    name = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        return dataclasses.replace(super().model_shape(config), visual_tokens_per_image=0)  # AnyRes: varies

    def vision_sequences(self, inputs, sample: int = 0) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        v = cfg.vision_config
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        if inputs["input_ids"].shape[0] != 1:
            # images are not attributed to samples in the inputs (adjacent images share one placeholder run)
            raise UnsupportedModelError("vision FLOPs of LLaVA-NeXT inputs are counted for batch size 1")
        crops = [
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=v.image_size
            )
            for size in inputs["image_sizes"].tolist()
        ]
        return [tokens] * sum(crops)

    fixed_grid = None  # AnyRes: every image has its own layout
    image_grids = Adapter.image_grids  # AnyRes tiles are not drawn yet: refused with a clear error
