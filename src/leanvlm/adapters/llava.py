import torch

from .. import compat
from ..errors import UnsupportedModelError
from ..flops import ModelShape, VisionShape
from ..registry import register_adapter
from .base import Adapter


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5 style models (``LlavaForConditionalGeneration``): one fixed-size grid of visual
    tokens per image, spliced in at the ``<image>`` placeholder tokens."""

    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def tower(self) -> str | None:
        return "cls" if compat.has_cls_token(self.model.model.vision_tower) else None

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
                heads=v.num_attention_heads,
                feature_layer=layers % (v.num_hidden_layers + 1) - 1 if isinstance(layers, int) else None,
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

    def image_grids(self, inputs) -> list[tuple[list, torch.Tensor]]:
        """One panel per image: its fixed grid, filled row by row."""
        from ..viz import raster_layout

        if self.fixed_grid is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: vision_feature_select_strategy='full' puts the CLS feature "
                "among the visual tokens, which are then not a grid; leanvlm viz needs 'default'"
            )
        return [raster_layout(*self.fixed_grid) for _ in range(inputs["pixel_values"].shape[0])]

    def visual_mask(self, input_ids, inputs_embeds):
        token_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        # Same rule as the model itself when it is given embeddings: placeholders embed to the token's row.
        embed = self.model.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == embed).all(-1)

    def feature_layer(self) -> tuple[int, bool]:
        cfg = self.model.config
        layer = cfg.vision_feature_layer
        n = len(self.vision_layers)
        if not isinstance(layer, int) or not -(n + 1) <= layer <= n:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: vision_feature_layer={layer!r}; reading image features from the "
                "tower needs one layer"
            )
        return layer % (n + 1) - 1, cfg.vision_feature_select_strategy == "full"

    def cls_query_key(self, layer: int, hidden: torch.Tensor):
        """(q of the CLS token [S, H, 1, Dh], k of every token [S, H, N, Dh], scale) as vision encoder
        layer ``layer`` computes them from its input ``hidden`` [S, N, D]."""
        return compat.vision_query_key(self.vision_layers[layer], hidden)

    @property
    def projector(self):
        return self.model.model.multi_modal_projector

    def feature_sources(self, vision_inputs: dict, sequences: int) -> list[torch.Tensor]:
        n = self.model_shape(self.model.config).visual_tokens_per_image
        first = 0 if self.feature_layer()[1] else 1  # "default" drops the CLS token's feature
        tokens = torch.arange(first, first + n)
        return [torch.stack([torch.full_like(tokens, g), tokens], -1) for g in range(sequences)]
