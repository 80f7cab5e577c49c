import torch

from ..flops import ModelShape, VisionShape
from ..registry import register_adapter
from .base import Adapter


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5 style models (``LlavaForConditionalGeneration``): one fixed-size grid of visual
    tokens per image, spliced in at the ``<image>`` placeholder tokens."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        v, t = config.vision_config, config.text_config
        grid = v.image_size // v.patch_size
        layers = config.vision_feature_layer
        n_feature_layers = 1 if isinstance(layers, int) else len(layers)
        per_image = grid * grid + (1 if config.vision_feature_select_strategy == "full" else 0)
        return ModelShape(
            name=cls.name,
            text=cls.text_shape(t),
            vision=VisionShape(
                layers=v.num_hidden_layers,
                hidden=v.hidden_size,
                intermediate=v.intermediate_size,
                tokens=grid * grid + 1,
                patch_size=v.patch_size,
                channels=v.num_channels,
            ),
            projector=((v.hidden_size * n_feature_layers, t.hidden_size), (t.hidden_size, t.hidden_size)),
            visual_tokens_per_image=per_image,
        )

    @property
    def fixed_grid(self) -> tuple[int, int] | None:
        if self.model.config.vision_feature_select_strategy == "full":
            return None  # the CLS feature rides along: the tokens are not a grid
        v = self.model.config.vision_config
        return (v.image_size // v.patch_size,) * 2

    def image_token_counts(self, vision_inputs) -> int:
        return self.model_shape(self.model.config).visual_tokens_per_image

    def image_grids(self, inputs) -> list[tuple[int, int]]:
        return [self.fixed_grid] * inputs["pixel_values"].shape[0]

    def visual_mask(self, input_ids, inputs_embeds):
        token_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        # Same rule as the model itself when it is given embeddings: placeholders embed to the token's row.
        embed = self.model.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == embed).all(-1)
