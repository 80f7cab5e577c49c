from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import compat
from ..engine import Insert, Keep, Replace, Step, VisionRun
from ..errors import ConfigError, LeanVLMError, UnsupportedModelError, check_range, is_int, show
from ..modules import attached
from ..modules.crossget import CrossGETModules, symmetric_kl
from ..ops.merge import complete_graph_match, ensemble_merge
from ..registry import register_method
from .base import POSITIONS, Method
from .prellm import first_items

STATE = "crossget"


@register_method("crossget")
@dataclass(frozen=True)
class CrossGET(Method):
    """CrossGET: inside the vision tower, every encoder layer merges ``merge_per_layer`` tokens into others
    (between its attention and its MLP), guided by an image cross token; the LLM sees the merged tokens
    and the cross token. On LLaVA-1.5 the default takes 576 visual tokens to 278 (277 merged patch
    tokens and the cross token), as the reference.

    Paper: "CrossGET: Cross-Guided Ensemble of Tokens for Accelerating Vision-Language Transformers"
    (Shi et al., ICML 2024, arXiv 2305.17455). Reference code: https://github.com/sdc17/CrossGET

    Per layer: the image cross token (a copy of CLS appended at the tower's input, carried through the
    layers, plus a learned per-layer offset) takes part in attention like any token; importance = the
    mean attention a token receives + the cross token's attention to it; complete-graph soft matching
    (a token may pair only with tokens less redundant than itself) picks the sources (low importance,
    high redundancy) and their most similar destinations; each pair is merged with softmax(importance)
    weights on size-weighted features; sizes add up and enter attention as a log(size) key bias
    (proportional attention). CLS and the cross token are never merged; the order is preserved.

    In the LLM a learned per-layer offset is added to each sample's first token (the text cross token,
    prefill only), and training adds ``kd_weight`` x the symmetric KL between the image cross tokens
    (through the detached projector) and the text cross tokens. Its modules (``lv.prepare``) are the
    two sets of offsets, zero-initialised: without them (or untrained) CrossGET is importance-weighted
    complete-graph merging, training-free.

    Args:
        merge_per_layer: tokens merged in every encoder layer (13; 0 is the no-op: no cross token).
        kd_weight: weight of the cross-token distillation loss in training (0.001, the reference's 7B).
        positions: "auto" (the reference: "compact", the shortened sequence numbered consecutively),
            "original" (text keeps its position ids).

    Differences from the reference:
        - The image features go to the model's own projector and placeholders: the feature layer's merged
          tokens are laid back onto their destinations' patch slots for the model, and before the LLM only
          those slots are kept (in order) and the cross token is inserted after the image's last one. It
          shares that token's position id (the reference gives it its own: text after it is one lower).
        - The text cross token is each sample's first real token (the reference: sequence position 0,
          which is padding in a left-padded batch).
        - Layers that merge compute attention by hand (float32 softmax), whose probabilities give the
          output and the importance, as the reference's eager attention; a layer that merges nothing runs
          sdpa with the log-size bias as its float mask.
        - LLaVA-1.5 only: LLaVA-NeXT's AnyRes packing and Qwen-VL's window attention and 2x2 merger are
          refused by name.
    """

    merge_per_layer: int = 13
    kd_weight: float = 0.001
    positions: str = "auto"

    stage = "vision"
    trainable = True
    requires_modules = False
    reference_positions = "compact"

    def __post_init__(self):
        if not is_int(self.merge_per_layer) or self.merge_per_layer < 0:
            raise ConfigError(
                f"CrossGET: merge_per_layer={show(self.merge_per_layer)} must be an integer >= 0"
            )
        check_range("CrossGET", "kd_weight", self.kd_weight, 0.0, math.inf)
        self._check_choice("positions", self.positions, POSITIONS)

    @property
    def is_noop(self) -> bool:
        return self.merge_per_layer == 0

    def check_adapter(self, adapter) -> None:
        super().check_adapter(adapter)
        if self.is_noop:
            return  # nothing runs: any model
        name = type(adapter.model).__name__
        if adapter.fixed_grid is None or adapter.tower != "cls":
            raise UnsupportedModelError(
                f"CrossGET: {name} is not supported (its image features are not one CLS-led sequence per image "
                "with a fixed patch grid); supported: LlavaForConditionalGeneration"
            )
        layer, with_cls = adapter.feature_layer()
        if with_cls:
            raise UnsupportedModelError(
                f"CrossGET: {name} passes the CLS feature to the LLM (vision_feature_select_strategy='full'); "
                "supported: 'default'"
            )
        for i in range(layer + 1):
            compat.clip_layer_parts(adapter.vision_layers[i])

    def module_key(self) -> str:
        return "CrossGET"

    def build_modules(self, adapter):
        v = adapter.model.config.vision_config
        text = adapter.text_config
        return CrossGETModules(
            len(adapter.vision_layers), v.hidden_size, adapter.num_layers, text.hidden_size
        )

    def plan(self, adapter) -> list:
        registry = attached(adapter.model)
        modules = (
            registry[self.module_key()] if registry is not None and self.module_key() in registry else None
        )
        feature, _ = adapter.feature_layer()
        tower = _Tower(self, adapter, modules, feature)
        items = [VisionRun(0, len(adapter.vision_layers), tower.run), Step(0, tower.before_llm)]
        if modules is not None and adapter.num_layers > 1:
            items.append(Replace(1, adapter.num_layers, tower.text_layer))
        return items

    # --- accounting ------------------------------------------------------------------------------------
    def kept_per_image(self, patches: int, feature_layer: int) -> int:
        """Merged patch tokens an image of ``patches`` gives the LLM when the features are read from
        encoder layer ``feature_layer`` (the cross token not counted)."""
        n = patches + 2  # CLS and the cross token
        for _ in range(feature_layer + 1):
            n -= min(self.merge_per_layer, (n - 2) // 2)
        return n - 2

    def tower_schedule(self, vision) -> list[tuple[int, int]]:
        n, out = vision.tokens + 1, []  # + the cross token
        for _ in range(vision.layers):
            r = min(self.merge_per_layer, (n - 2) // 2)
            out.append((n, n - r))
            n -= r
        return out

    def visual_schedule(self, num_layers: int, images: list[int], vision=None) -> list[int]:
        """Visual tokens per decoder layer: each image's merged patch tokens (its cross token is an
        inserted token, :meth:`extra_tokens`). ``vision``: the tower's shape
        (:class:`leanvlm.flops.VisionShape`); without it, LLaVA-1.5's (24 layers, features from the 23rd)."""
        feature = (
            22
            if vision is None
            else (vision.feature_layer if vision.feature_layer is not None else vision.layers - 2)
        )
        return [sum(self.kept_per_image(n, feature) for n in images if n)] * num_layers

    def extra_tokens(self, num_layers: int, images: list[int]) -> list[int]:
        return [len([n for n in images if n])] * num_layers

    @classmethod
    def bench_default(cls, num_layers: int) -> Method:
        return cls()

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> Method:
        raise ConfigError(
            "CrossGET's token count follows the vision tower's depth, not a budget: choose merge_per_layer "
            "(13 gives 278 of 576 on LLaVA-1.5's 24-layer tower)"
        )


class _Tower:
    """The runners of one applied CrossGET: the tower's layers, the input stage and the text cross token."""

    def __init__(self, method: CrossGET, adapter, modules, feature: int):
        self.method, self.adapter, self.modules, self.feature = method, adapter, modules, feature

    # --- the vision tower --------------------------------------------------------------------------------
    def run(self, vctx, i, layer, hidden, call_layer):
        if i == 0:
            vctx.store[STATE] = {"cross": [], "orig": None, "size": None}
            hidden = torch.cat([hidden, hidden[:, :1]], 1)  # the cross token: a copy of CLS, last
            n = hidden.shape[1]
            st = vctx.store[STATE]
            st["orig"] = torch.arange(n, device=hidden.device).expand(hidden.shape[0], n)
            st["size"] = torch.ones(hidden.shape[0], n, device=hidden.device)
        st = vctx.store[STATE]
        if i == self.feature + 1:
            hidden = st.pop("compact")  # the feature layer handed the model the slot layout
        offset = self.modules.cross_image[i] if self.modules is not None else None
        cross = hidden[:, -1:].detach()
        cross = cross + offset.to(hidden.dtype) if offset is not None else cross
        hidden = torch.cat([hidden[:, :-1], cross], 1)
        st["cross"].append(cross[:, 0])
        n = hidden.shape[1]
        r = min(self.method.merge_per_layer, (n - 2) // 2)
        if compat.checkpointing_active(layer):  # the layer is computed by hand: checkpoint it here
            hidden, st["size"], keep = checkpoint(
                self._layer, layer, hidden, st["size"], r, use_reentrant=False
            )
        else:
            hidden, st["size"], keep = self._layer(layer, hidden, st["size"], r)
        if keep is not None:
            st["orig"] = st["orig"].gather(1, keep)
        vctx.record_tokens(n, n - r)
        if i != self.feature:
            return hidden
        st["compact"] = hidden
        st["kept"] = st["orig"][:, 1:-1] - 1  # patch indices of the merged tokens, ascending
        st["cross_feature"] = hidden[:, -1]
        return self._laid_out(hidden, st, vctx)

    def _layer(self, layer, x, size, r):
        """One encoder layer with proportional attention and, when ``r`` > 0, ``r`` merges between its
        attention and its MLP: (output, sizes, the kept tokens' indices or None)."""
        parts = compat.clip_layer_parts(layer)
        b, n, d = x.shape
        h = parts.layer_norm1(x)
        q, k, v = (
            p(h).view(b, n, parts.num_heads, parts.head_dim).transpose(1, 2)
            for p in (parts.q_proj, parts.k_proj, parts.v_proj)
        )
        bias = size.log().to(q.dtype)[:, None, None, :]
        keep = None
        if r == 0:  # no importance needed: any kernel, the log-size bias as sdpa's float mask
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.expand(b, 1, n, n), scale=parts.scale
            )
        else:  # the probabilities serve the output and the importance alike (one softmax)
            probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * parts.scale + bias.float(), -1)
            attn = probs.to(v.dtype) @ v
        x = x + parts.out_proj(attn.transpose(1, 2).reshape(b, n, d))
        if r > 0:
            with torch.no_grad():
                mean = probs.detach().mean(1)  # [B, N, N] head mean
                importance = mean[:, :-1].mean(1) + mean[:, -1]
                protected = torch.zeros(n, dtype=torch.bool, device=x.device)
                protected[[0, n - 1]] = True
                src, dst, keep = complete_graph_match(k.detach().mean(1), importance, r, protected)
            x, size = ensemble_merge(x, size, importance, src, dst, keep)
        return x + parts.mlp(parts.layer_norm2(x)), size, keep

    def _laid_out(self, hidden, st, vctx):
        """The feature layer's output as the model reads it: CLS, then every patch slot, the merged tokens
        on their destinations' slots (the others zero); the cross token is kept aside."""
        b, _, d = hidden.shape
        patches = self.adapter.fixed_grid[0] * self.adapter.fixed_grid[1]
        out = hidden.new_zeros(b, patches + 1, d)
        out = out.index_copy(1, torch.tensor([0], device=hidden.device), hidden[:, :1])
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(st["kept"])
        return out.index_put((rows, st["kept"] + 1), hidden[:, 1:-1])

    # --- before the LLM ----------------------------------------------------------------------------------
    def before_llm(self, ctx):
        st = ctx.vision.get(STATE)
        if st is None or "kept" not in st:
            raise LeanVLMError(
                "CrossGET: the vision tower did not run through the applied method in this call (image "
                "features computed before lv.apply, or passed in as embeddings?)"
            )
        s = ctx.state
        per_sample = ctx.image_slots()
        starts = first_items([len(images) for images in per_sample], ctx.replicas)
        keep = s.valid & ~s.visual
        anchors, images = [], []
        for b, sample in enumerate(per_sample):
            anchors.append([])
            images.append([])
            for j, (_, slots) in enumerate(sorted(sample.items())):
                g = starts[b] + j
                if (
                    g >= st["kept"].shape[0]
                    or len(slots) != self.adapter.fixed_grid[0] * self.adapter.fixed_grid[1]
                ):
                    raise LeanVLMError(
                        f"CrossGET: image {j} of sample {b} has {len(slots)} visual tokens; the tower ran "
                        f"{st['kept'].shape[0]} image(s) of {self.adapter.fixed_grid[0] * self.adapter.fixed_grid[1]}"
                    )
                chosen = torch.tensor(slots, device=keep.device)[st["kept"][g].to(keep.device)]
                keep[b, chosen] = True
                anchors[b].append(int(chosen[-1]))
                images[b].append(g)
        hidden = ctx.hidden
        if self.modules is not None:
            hidden = self._text_cross(ctx, hidden, 0)
        compact = self.method.resolved_positions(ctx.adapter.supports_compact_positions) == "compact"
        first = Keep(keep, compact=compact, hidden=hidden if self.modules is not None else None)
        cross = self.adapter.project(st["cross_feature"])  # [images, D]
        width = max(1, max(map(len, images)))

        def insert(after_keep):
            orig = after_keep.state.orig
            where = [[int((orig[b] == a).nonzero()[0, 0]) for a in row] for b, row in enumerate(anchors)]
            valid = torch.tensor(
                [[True] * len(r) + [False] * (width - len(r)) for r in where], device=orig.device
            )
            after = torch.tensor([r + [0] * (width - len(r)) for r in where], device=orig.device)
            index = torch.tensor([r + [0] * (width - len(r)) for r in images], device=cross.device)
            return Insert(cross[index].to(after_keep.hidden.dtype), after, valid)

        return [first, insert]

    # --- the text cross token ----------------------------------------------------------------------------
    def _text_cross(self, ctx, hidden, layer):
        s = ctx.state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        first = s.valid.long().argmax(-1)
        token = hidden[rows, first].detach() + self.modules.cross_text[layer].to(hidden.dtype)
        ctx.shared.setdefault("crossget_text", {})[layer] = token
        return hidden.index_put((rows, first), token)

    def text_layer(self, ctx, layer_idx, layer, hidden, call_layer):
        if ctx.decoding:
            return call_layer(hidden)
        out = call_layer(self._text_cross(ctx, hidden, layer_idx))
        if layer_idx == self.adapter.num_layers - 1 and ctx.training and self.method.kd_weight > 0:
            ctx.add_loss(self.method.kd_weight * self._distillation(ctx))
        return out

    def _distillation(self, ctx):
        """Symmetric KL between each sample's first image's cross tokens (vision layer i repeated over
        the LLM layers it maps to, through the projector with its weights detached) and its text cross
        tokens at every LLM layer."""
        st = ctx.vision[STATE]
        text = ctx.shared["crossget_text"]
        num_layers, vision_layers = self.adapter.num_layers, len(st["cross"])
        projector = self.adapter.projector
        frozen = {name: p.detach() for name, p in projector.named_parameters()}
        image = torch.func.functional_call(projector, frozen, (torch.stack(st["cross"], 1),))  # [I, V, D]
        repeat = [
            int((i + 1) * num_layers / vision_layers) - int(i * num_layers / vision_layers)
            for i in range(vision_layers)
        ]
        image = image.repeat_interleave(torch.tensor(repeat, device=image.device), dim=1)  # [I, L, D]
        per_sample = ctx.image_slots()
        starts = first_items([len(images) for images in per_sample], ctx.replicas)
        rows = [b for b, images in enumerate(per_sample) if images]
        if not rows:
            return image.sum() * 0
        txt = torch.stack([text[layer] for layer in range(num_layers)], 1)[rows]  # [S, L, D]
        img = image[[starts[b] for b in rows]]
        return symmetric_kl(img, txt)
