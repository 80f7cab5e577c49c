"""What the engine needs to know about a model. All model-specific knowledge lives in adapters/."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import compat
from ..errors import LeanVLMError, UnsupportedModelError
from ..flops import ModelShape, TextShape
from ..ops.rope import apply_rope


def assign_image_ids(visual: torch.Tensor, counts: list[int] | int | None, first: int = 0) -> torch.Tensor:
    """[B, N] long: the image (numbered from ``first`` over the batch, in order) of each visual token, -1
    elsewhere. Images fill the visual positions in row-major order, as the model scatters their features.

    ``counts``: placeholder tokens of each image of the batch, in order; an int when every image has
    the same count; None when unknown (then each run of consecutive visual tokens is one image)."""
    rows = visual.tolist()
    out = [[-1] * len(r) for r in rows]
    total = sum(map(sum, rows))
    if isinstance(counts, int) and counts > 0:
        if total % counts:
            raise LeanVLMError(
                f"the inputs hold {total} visual tokens, not a multiple of the {counts} tokens every image gives"
            )
        counts = [counts] * (total // counts)
    if counts is not None and sum(counts) != total:
        raise LeanVLMError(
            f"the inputs hold {total} visual tokens but their images account for {sum(counts)} "
            f"({counts}); the placeholders do not match the images"
        )
    image, left = first - 1, 0
    for b, row in enumerate(rows):
        previous = False
        for j, is_visual in enumerate(row):
            if is_visual:
                if counts is None:
                    if not previous:
                        image += 1
                else:
                    if left == 0:
                        image += 1
                        left = counts[image - first]
                    left -= 1
                out[b][j] = image
            previous = is_visual
    return torch.tensor(out, dtype=torch.long, device=visual.device).reshape(visual.shape)


@dataclass(frozen=True)
class LayerParts:
    """A LLaMA-style decoder layer taken apart, for runners that compute a layer by hand
    (:mod:`leanvlm.engine.stack`): x + attn(norm(x)), then h + mlp(post_norm(h))."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    post_norm: nn.Module
    mlp: nn.Module
    head_dim: int
    scaling: float


class Adapter:
    """Base adapter for VLMs whose LLM is a stack of LLaMA-style decoder layers.

    A subclass names the model classes it serves and says where the pieces are; the methods and the
    engine ask only these questions.
    """

    name: str = "base"
    model_classes: tuple[str, ...] = ()
    #: RoPE positions can be re-numbered (False for M-RoPE, whose ids encode (t, h, w)).
    supports_compact_positions: bool = True
    #: the vision tower's kind, for methods that read it: "cls" (a CLS token leads one sequence per image
    #: or tile: CLIP), "patches" (every image's patches in one sequence, merged after the blocks: Qwen-VL),
    #: None (neither, or not known: e.g. SigLIP)
    tower: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        layer = self.layers[0]
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj")
        if attn is None or not all(hasattr(attn, n) for n in needed) or not hasattr(layer, "input_layernorm"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: its language model {type(self.text_model).__name__} does not have "
                "LLaMA-style decoder layers (input_layernorm, self_attn.q_proj / k_proj)"
            )

    # --- where things are -------------------------------------------------------------------------
    @property
    def vlm_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` (to locate the visual tokens)."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The bare decoder stack (no LM head)."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The vision tower's encoder layers, in order (CLIP-style towers: ``vision_tower.encoder.layers``)."""
        tower = self.model.model.vision_tower
        encoder = getattr(tower, "encoder", None) or getattr(
            getattr(tower, "vision_model", None), "encoder", None
        )
        if encoder is None or not hasattr(encoder, "layers"):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: no encoder layers found in its vision tower"
            )
        return encoder.layers

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def attn_implementation(self) -> str:
        return compat.attn_implementation(self.text_config)

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        """The shapes FLOPs accounting needs, from the model config alone (no weights)."""
        raise NotImplementedError

    @staticmethod
    def text_shape(text_config) -> TextShape:
        heads = text_config.num_attention_heads
        return TextShape(
            num_layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            vocab=text_config.vocab_size,
        )

    #: (rows, cols) of visual tokens of every image when all images give the same grid, else None
    fixed_grid: tuple[int, int] | None = None

    def vision_sequences(self, inputs, sample: int = 0) -> list[int] | None:
        """Lengths of the sequences the vision tower ran for ``sample`` (for FLOPs), or None when every
        image gives the shape's fixed length."""
        return None

    # --- the vision tower's image features (methods that read the tower: VisionZip) --------------------
    def feature_layer(self) -> tuple[int, bool]:
        """(j, cls): the image features are the output of vision encoder layer ``j`` (0-based); ``cls``:
        they include the CLS token's."""
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: reading image features from its vision tower is supported on "
            "LlavaForConditionalGeneration and LlavaNextForConditionalGeneration"
        )

    @property
    def projector(self) -> nn.Module:
        """The module that maps vision-tower features into the LLM's input space."""
        raise UnsupportedModelError(f"{type(self.model).__name__}: its projector is not reachable")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's projector: vision-tower features [..., D_vision] -> the LLM's input space."""
        return self.projector(features)

    @classmethod
    def processor_without_torchvision(cls, path_or_id: str, config, error: Exception):
        """A processor for a checkpoint of this model whose processor class can not be built without
        torchvision (``error``); models that have no such stand-in re-raise it."""
        raise error

    def feature_sources(self, vision_inputs: dict, sequences: int) -> list[torch.Tensor]:
        """Per image of the batch, in order: [N, 2] long, the (vision-tower sequence, token) each of its N
        visual tokens is the projected feature of, (-1, -1) for tokens made otherwise (LLaVA-NeXT's row
        newlines). ``sequences``: how many sequences the tower ran."""
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: its visual tokens are not mapped to the tower"
        )

    def token_grid(self, n: int, vision_inputs: dict) -> tuple[int, int] | None:
        """(rows, cols) of an image (or video frame) with ``n`` visual tokens laid out as a raster grid,
        when the model's layout says so unambiguously; None otherwise."""
        grid = self.fixed_grid
        return grid if grid is not None and grid[0] * grid[1] == n else None

    def visual_layout(self, vision_inputs: dict, image: int, n: int):
        """Where the ``n`` visual tokens of image ``image`` of the batch (numbered as :meth:`image_ids`)
        sit: ``(cells, tiles)``, with ``cells`` [n, 3] long the (tile, row, col) of each token on its
        tile's raster grid ((-1, -1, -1) for a token on no grid, e.g. a row newline) and ``tiles`` the
        (rows, cols) of each tile; None when the model's layout does not say."""
        grid = self.token_grid(n, vision_inputs)
        if grid is None:
            return None
        rows, cols = grid
        index = torch.arange(n)
        return torch.stack([torch.zeros_like(index), index // cols, index % cols], -1), [grid]

    # --- questions the visualisation asks -------------------------------------------------------------
    def image_grids(self, inputs) -> list[tuple[list, torch.Tensor]]:
        """Where ``leanvlm viz`` draws the visual tokens of each image of the batch (in order, as
        :meth:`image_ids` numbers them): ``(panels, cells)``, with ``panels`` the pictures of the image
        (:class:`leanvlm.viz.Panel`: a grid of rows x cols tokens over each picture of
        :meth:`model_view`) and ``cells`` [n, 3] long the (panel, row, col) of each of its n visual
        tokens in order (col -1: the token that ends that row, e.g. LLaVA-NeXT's row newline)."""
        raise UnsupportedModelError(
            "leanvlm viz supports LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models; not "
            f"{type(self.model).__name__} yet"
        )

    def model_view(self, inputs, processor) -> list[list]:
        """The images as the model saw them (after resizing / cropping): per image, a PIL picture per
        panel of :meth:`image_grids`. Here: one picture per image of ``pixel_values`` [images, 3, H, W]."""
        from ..viz import picture_from_pixels

        return [[picture_from_pixels(pixels, processor)] for pixels in inputs["pixel_values"]]

    # --- questions the engine asks ----------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, N] bool: which input positions hold visual tokens."""
        raise NotImplementedError

    def image_token_counts(self, vision_inputs: dict) -> list[int] | int | None:
        """Placeholder tokens of each image of the batch in order (an int when every image has the same
        count; None when the inputs do not say)."""
        return None

    def image_ids(self, visual: torch.Tensor, vision_inputs: dict | None) -> torch.Tensor:
        """[B, N] long: which image of the batch each visual token of ``visual`` [B, N] belongs to (-1 for
        other tokens). Images that stand back to back are told apart by their token counts."""
        return assign_image_ids(visual, self.image_token_counts(vision_inputs or {}))

    def query_key(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        query_slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries of ``query_slots`` [B, Q] and keys of every token, as layer ``layer_idx`` computes them
        from its input ``hidden`` [B, N, D]: input norm, q/k projections (and q/k norms where the model has
        them), RoPE. Returns q [B, H, Q, Dh], k [B, H_kv, N, Dh] and the attention scaling."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        b, n, d = hidden.shape
        hd = attn.head_dim
        x = layer.input_layernorm(hidden)
        xq = x.gather(1, query_slots[..., None].expand(-1, -1, d))
        q = attn.q_proj(xq).view(b, query_slots.shape[1], -1, hd)
        k = attn.k_proj(x).view(b, n, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        slots = query_slots[..., None].expand(-1, -1, cos.shape[-1])
        q = apply_rope(q.transpose(1, 2), cos.gather(1, slots), sin.gather(1, slots))
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return q, k, attn.scaling

    def layer_parts(self, layer_idx: int) -> LayerParts:
        """Decoder layer ``layer_idx``'s parts, for computing it by hand; refused (naming what) for a
        layer that is more than pre-norm attention + pre-norm MLP (sliding windows, logit soft-capping,
        extra norms, attention sinks)."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        owner = f"{type(self.model).__name__} decoder layer {layer_idx} ({type(layer).__name__})"
        needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        missing = [n for n in needed if not hasattr(attn, n)]
        missing += [
            n for n in ("input_layernorm", "post_attention_layernorm", "mlp") if not hasattr(layer, n)
        ]
        if missing:
            raise UnsupportedModelError(
                f"{owner}: can not be computed by hand; it has no {', '.join(missing)}"
            )
        extras = [
            f"{n}={getattr(attn, n)!r}"
            for n in ("sliding_window", "attn_logit_softcapping", "sinks")
            if getattr(attn, n, None) is not None
        ]
        extras += [
            n for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm") if hasattr(layer, n)
        ]
        if extras:
            raise UnsupportedModelError(
                f"{owner}: can not be computed by hand: it has {', '.join(extras)} (supported: plain pre-norm "
                "attention and MLP, as LLaMA / Qwen2 layers)"
            )
        return LayerParts(
            input_norm=layer.input_layernorm,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
            post_norm=layer.post_attention_layernorm,
            mlp=layer.mlp,
            head_dim=attn.head_dim,
            scaling=attn.scaling,
        )

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``position_ids`` as the LLM computes them."""
        return compat.rotary(self.text_model, hidden, position_ids)
