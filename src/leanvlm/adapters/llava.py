import torch

from ..registry import register_adapter
from .base import Adapter


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5 style models (``LlavaForConditionalGeneration``): one fixed-size grid of visual
    tokens per image, spliced in at the ``<image>`` placeholder tokens."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def visual_mask(self, input_ids, inputs_embeds):
        token_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        # Same rule as the model itself when it is given embeddings: placeholders embed to the token's row.
        embed = self.model.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == embed).all(-1)
