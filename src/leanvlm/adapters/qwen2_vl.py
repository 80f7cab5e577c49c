import torch

from .. import compat
from ..errors import UnsupportedModelError
from ..flops import ModelShape, VisionShape
from ..registry import register_adapter
from .base import Adapter, assign_image_ids


@register_adapter
class QwenVLAdapter(Adapter):
    """Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

    Visual tokens are the ``<|image_pad|>`` and ``<|video_pad|>`` positions (video frames count as
    visual tokens); their number follows each image's size. Positions are M-RoPE ids (t, h, w): the
    rotary tables the text model hands to its layers already merge the three sections, so kept
    tokens keep their own rotation by gathering those tables, and the ids themselves can not be
    renumbered (``positions="compact"`` is refused). Decode positions come from transformers'
    ``rope_deltas`` and layer 0's cache length, both in original coordinates.
    Inputs need ``mm_token_type_ids`` (the processors return it); without it Qwen2.5-VL silently
    falls back to 1-D positions.
    """

    @property
    def vision_layers(self):
        """The vision transformer's blocks (patch sequences of all images, concatenated)."""
        return self.model.model.visual.blocks

    name = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    supports_compact_positions = False
    tower = "patches"

    # --- the vision tower, for methods that read it (VisionZip) --------------------------------------
    @property
    def merge_unit(self) -> int:
        """Patches merged into one visual token (2x2)."""
        return self.model.config.vision_config.spatial_merge_size**2

    def attention_block(self) -> int:
        """The last vision block that attends over whole images (frames): Qwen2.5-VL's others attend
        within windows."""
        visual = self.model.model.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        return max(full) if full else len(visual.blocks) - 1

    def patch_query_key(self, layer: int, hidden: torch.Tensor, kwargs: dict):
        """(q, k with RoPE [H, P, Dh], k without RoPE, scaling, cu_seqlens) as vision block ``layer``
        computes them from its input ``hidden`` [P, D] and its call arguments."""
        return compat.qwen_vision_query_key(self.vision_layers[layer], hidden, kwargs)

    def window_index(self, grid: torch.Tensor) -> torch.Tensor | None:
        """For each merged group of the blocks' patch order, its raster index (None: raster already)."""
        return compat.qwen_window_index(self.model.model.visual, grid)

    def tower_run(self, vision_inputs: dict, patches: int, done: dict) -> tuple[str, torch.Tensor]:
        """("image" | "video", its grid_thw) of a run of the tower over ``patches`` patches: images run
        first, then videos (``done``: the kinds already seen in this call)."""
        for kind in ("image", "video"):
            grid = vision_inputs.get(f"{kind}_grid_thw")
            if kind not in done and grid is not None and int(grid.prod(-1).sum()) == patches:
                return kind, grid
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: a vision tower run over {patches} patches matches neither "
            "image_grid_thw nor video_grid_thw of the call"
        )

    def token_grid(self, n: int, vision_inputs: dict) -> tuple[int, int] | None:
        """The merged (h, w) of the call's image or video grids whose frames have ``n`` tokens, when
        exactly one shape matches."""
        merge = self.model.config.vision_config.spatial_merge_size
        shapes = {
            (h // merge, w // merge)
            for key in ("image_grid_thw", "video_grid_thw")
            if vision_inputs.get(key) is not None
            for _, h, w in vision_inputs[key].tolist()
            if (h // merge) * (w // merge) == n
        }
        return shapes.pop() if len(shapes) == 1 else None

    @property
    def projector(self):
        """Qwen-VL's patch merger (it also merges 2x2 patches into one token)."""
        return self.model.model.visual.merger

    def project(self, features):
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: its merger projects groups of 2x2 patches, not single features"
        )

    @classmethod
    def processor_without_torchvision(cls, path_or_id: str, config, error: Exception):
        """The image processor, the tokenizer and the checkpoint's chat template, wrapped to build inputs as
        the processor does (its video processor needs torchvision)."""
        if "torchvision" not in str(error).lower():
            raise error
        import warnings

        from transformers import AutoImageProcessor, AutoTokenizer

        from ..loading import saved_chat_template
        from ..qwen_inputs import QwenVLInputs

        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image_processor = AutoImageProcessor.from_pretrained(path_or_id)
        merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 2)
        inputs = QwenVLInputs(tokenizer, image_processor, merge_size=merge)
        template = saved_chat_template(path_or_id) or getattr(tokenizer, "chat_template", None)
        if template:
            inputs.chat_template = template
        return inputs

    def visual_layout(self, vision_inputs: dict, image: int, n: int):
        """An image, or one video frame, is one grid: the merged (h, w) of its entry in
        ``image_grid_thw`` (images are numbered first) or ``video_grid_thw`` (then every frame), as
        :meth:`image_ids` numbers them."""
        merge = self.model.config.vision_config.spatial_merge_size
        grids = [
            (h // merge, w // merge)
            for key in ("image_grid_thw", "video_grid_thw")
            if vision_inputs.get(key) is not None
            for t, h, w in vision_inputs[key].tolist()
            for _ in range(t)
        ]
        if image >= len(grids) or grids[image][0] * grids[image][1] != n:
            return None
        rows, cols = grids[image]
        index = torch.arange(n)
        return torch.stack([torch.zeros_like(index), index // cols, index % cols], -1), [grids[image]]

    def visual_kind(self, token, kinds) -> str:
        """ "image" or "video" for a visual token ``token`` (None when the input ids are not known: the
        only kind in ``kinds``)."""
        if token is None:
            if len(kinds) != 1:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__}: images and videos in one call given as inputs_embeds can "
                    "not be told apart; pass input_ids"
                )
            return next(iter(kinds))
        return "video" if int(token) == getattr(self.model.config, "video_token_id", None) else "image"

    def _visual_ids(self) -> list[int]:
        cfg = self.model.config
        return [i for i in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if i is not None]

    def visual_mask(self, input_ids, inputs_embeds):
        ids = self._visual_ids()
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        table = self.model.get_input_embeddings()
        mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for i in ids:
            mask |= (inputs_embeds == table(torch.tensor(i, device=inputs_embeds.device))).all(-1)
        return mask

    def image_ids(self, visual, vision_inputs):
        """Images and video frames are numbered apart: image tokens from ``image_grid_thw`` (one image,
        h*w/merge^2 tokens), video tokens per frame from ``video_grid_thw`` (t frames of h*w/merge^2)."""
        vision_inputs = vision_inputs or {}
        ids = vision_inputs.get("input_ids") if vision_inputs.get("has_input_ids") else None
        if ids is None or ids.shape != visual.shape:
            return assign_image_ids(visual, None)
        cfg = self.model.config
        merge = cfg.vision_config.spatial_merge_size**2
        out = torch.full_like(ids, -1, dtype=torch.long)
        first = 0
        kinds = (
            (cfg.image_token_id, "image_grid_thw"),
            (getattr(cfg, "video_token_id", None), "video_grid_thw"),
        )
        for token, key in kinds:
            if token is None:
                continue
            grid = vision_inputs.get(key)
            counts = None
            if grid is not None:
                counts = [h * w // merge for t, h, w in grid.tolist() for _ in range(t)]
            part = assign_image_ids((ids.to(visual.device) == token) & visual, counts, first)
            out = torch.where(part >= 0, part, out)
            first = int(out.max()) + 1
        return out

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        v, t = config.vision_config, config.text_config
        merge = v.spatial_merge_size**2
        if hasattr(v, "embed_dim"):  # Qwen2-VL: plain MLP, merger projects to the text width
            width, inter, mlp, out = v.embed_dim, v.embed_dim * v.mlp_ratio, 2, v.hidden_size
        else:  # Qwen2.5-VL: gated MLP
            width, inter, mlp, out = v.hidden_size, v.intermediate_size, 3, v.out_hidden_size
        vision = VisionShape(
            layers=v.depth,
            hidden=width,
            intermediate=inter,
            tokens=0,
            patch_size=v.patch_size,
            channels=v.in_channels,
            temporal_patch=v.temporal_patch_size,
            mlp_matrices=mlp,
            has_cls=False,
        )
        projector = ((width * merge, width * merge), (width * merge, out))
        return ModelShape(cls.name, cls.text_shape(t), vision, projector, 0)

    def vision_sequences(self, inputs, sample: int = 0) -> list[int]:
        # The tower attends within each frame (an image is one frame). Qwen2.5-VL's window attention is
        # counted as full attention over the frame: an over-count of its attention term.
        if inputs["input_ids"].shape[0] != 1:
            raise UnsupportedModelError("vision FLOPs of Qwen-VL inputs are counted for batch size 1")
        sequences = []
        for key in ("image_grid_thw", "video_grid_thw"):
            if inputs.get(key) is not None:
                for t, h, w in inputs[key].tolist():
                    sequences += [h * w] * t
        return sequences

    def _image_grids_thw(self, inputs) -> list[list[int]]:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: leanvlm viz draws images; the inputs have no image_grid_thw"
            )
        return grid.tolist()

    def image_grids(self, inputs) -> list[tuple[list, torch.Tensor]]:
        """One panel per image (per frame when an image has several), its merged grid filled row by
        row; each token covers 2x2 patches (``spatial_merge_size``)."""
        import dataclasses

        from ..viz import raster_layout

        merge = self.model.config.vision_config.spatial_merge_size
        note = f"one cell: one visual token, {merge}x{merge} patches merged"
        out = []
        for t, h, w in self._image_grids_thw(inputs):
            (panel,), cells = raster_layout(h // merge, w // merge)
            out += [([dataclasses.replace(panel, note=note)], cells)] * t
        return out

    def model_view(self, inputs, processor) -> list[list]:
        """Per image (frame), the picture put back together from its flattened patches: ``pixel_values``
        [patches, C * T * p * p], each image's patches in merge-block order (h/m, w/m, m, m)."""
        from ..viz import picture_from_pixels

        v = self.model.config.vision_config
        p, m, tp = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
        channels = getattr(v, "in_channels", None) or getattr(v, "in_chans", 3)
        pixels = inputs["pixel_values"]
        out, first = [], 0
        for t, h, w in self._image_grids_thw(inputs):
            patches = pixels[first : first + t * h * w].reshape(t, h // m, w // m, m, m, channels, tp, p, p)
            first += t * h * w
            for frame in range(t):
                x = patches[frame, :, :, :, :, :, 0]  # (h/m, w/m, m, m, C, p, p)
                x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * p, w * p)
                out.append([picture_from_pixels(x, processor)])
        return out
