from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.edits import Keep
from ..engine.plan import Step, Vision
from ..errors import ConfigError, LeanVLMError, UnsupportedModelError, check_range, is_int, show
from ..registry import register_method
from .base import POSITIONS, Method
from .prellm import first_items

#: CLS-attention scores and key similarities are compared at this resolution, so that float noise (a
#: vision tower run on a batch and on one image differs by about 1e-8) does not decide
RESOLUTION = 1e-6


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x / RESOLUTION) * RESOLUTION


def attention_received(q: torch.Tensor, k: torch.Tensor, scaling: float, bounds: list[int]) -> torch.Tensor:
    """[P] the attention each token receives, averaged over heads and query rows, within each segment
    ``bounds[i]:bounds[i+1]`` (an image or a frame) of q, k [H, P, Dh]; queries in chunks, so that no
    full attention matrix is held."""
    out = torch.zeros(q.shape[1], device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        keys = k[:, start:end]
        for row in range(start, end, 512):
            probs = torch.softmax(q[:, row : min(row + 512, end)] @ keys.transpose(-1, -2) * scaling, -1)
            out[start:end] += probs.sum(dim=(0, 1))
        out[start:end] /= q.shape[0] * (end - start)
    return out


@register_method("visionzip")
@dataclass(frozen=True)
class VisionZip(Method):
    """VisionZip: before the LLM, each image (each tile on LLaVA-NeXT, each frame of a Qwen-VL video)
    keeps ``dominant`` tokens, the ones its CLS token attends to most at the feature layer, plus
    ``contextual`` tokens that merge the rest by key similarity; training-free and text-agnostic.

    Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (Yang et al., CVPR
    2025, arXiv 2412.04467). Reference code: https://github.com/dvlab-research/VisionZip

    Per tower sequence (an image, or a tile), at the vision encoder layer whose output is the image
    features (LLaVA: ``vision_feature_layer=-2``):

    1. CLS attention: ``softmax(q_cls K^T * scale)`` over the sequence, summed over heads (one row of one
       layer, computed from the layer's own norm and q/k projections: any attention kernel elsewhere).
    2. Dominant: the ``dominant`` patches with the largest CLS attention.
    3. Contextual: the other patches in raster order; ``step = max(1, len(rest) // contextual)``, targets
       ``rest[::step][:contextual]``; each other patch joins the target whose head-mean key is most
       cosine-similar; a contextual token is ``target + mean(joined)`` in the tower's feature space (the
       reference's arithmetic: the target is added to the mean, not averaged with it), then projected by
       the model's projector.

    The LLM receives ``dominant + contextual`` tokens per image (tile), each at its source patch's place
    (the kept tokens keep their order).

    Args:
        dominant: dominant tokens per image or tile (>= 1). Default 54 (the reference's headline
            64-token setting, 54 + 10).
        contextual: contextual tokens per image or tile (>= 0). Default 10.
        keep_ratio: None (the counts above), or a share in (0, 1] of each image's (tile's) N tokens:
            ``k = round(N * keep_ratio)`` tokens, split between contextual and dominant in the ratio of
            ``contextual : dominant`` (ours: budgets as a share, for matched-budget comparisons; at 64/576
            with the defaults it is 54 + 10).
        positions: "auto" (the reference: "compact", the shortened sequence numbered 0..n-1),
            "original", "compact".

    No-op: ``contextual=0`` and ``dominant`` at least an image's (tile's) visual tokens, or
    ``keep_ratio=1.0``.

    Differences from the reference:
        - **CLS.** The reference keeps the CLS token as one of the D dominant tokens (D - 1 patches + CLS).
          Transformers' LLaVA with ``vision_feature_select_strategy="default"`` (every llava-hf
          checkpoint) has no CLS feature, so we keep D patches; with ``"full"`` the CLS feature is kept
          and D - 1 patches, as the reference.
        - **Order.** The reference hands the LLM [CLS, dominant in raster order, contextual]; ours keeps
          every token at its source patch's place (a contextual token at its target's).
        - **LLaVA-NeXT.** Per tile, as the reference, but the tiles stay in the model's own packing:
          selection is among the patches that survive un-padding, and the row newline tokens are
          dropped (the reference also adds no newline for the tiles); the reference scatters the tiles'
          dominant tokens onto the grid and appends all contextual tokens after them, without un-padding.
        - Scores and similarities are rounded to a 1e-6 grid; ties go to the earliest patch; every image of every sample is reduced
          (the reference's list-of-images path is broken).
        - The last prompt token is never dropped (kept on top of the budget when it is visual).
        - **Qwen2-VL / Qwen2.5-VL (ours).** Their towers have no CLS token and merge 2x2 patches after
          the last block. Importance is the attention each patch receives in the last block that
          attends over whole frames (Qwen2.5-VL's last full-attention block), averaged over heads and
          query rows, summed over the merged token's 4 patches; merge keys are that block's head-mean
          keys (before RoPE) averaged over the 4 patches; contextual tokens are merged from the
          merged features in the LLM's input space (the merger is not linear). Each image, and each
          frame of a video, keeps D + C. Qwen2.5-VL's window order is mapped back to raster order.

    The vision tower still runs in full (VisionZip only reads it); the extra CLS row, key means, the
    assignment and the contextual tokens' projection are counted as "selection" in the reports.
    """

    dominant: int = 54
    contextual: int = 10
    keep_ratio: float | None = None
    positions: str = "auto"

    stage = "vision"
    needs = ("vision", "image_ids")
    reference_positions = "compact"

    def __post_init__(self):
        if not is_int(self.dominant) or self.dominant < 1:
            raise ConfigError(f"VisionZip: dominant={show(self.dominant)} must be an int >= 1")
        if not is_int(self.contextual) or self.contextual < 0:
            raise ConfigError(f"VisionZip: contextual={show(self.contextual)} must be an int >= 0")
        if self.keep_ratio is not None:
            check_range("VisionZip", "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        self._check_choice("positions", self.positions, POSITIONS)

    @property
    def is_noop(self) -> bool:
        # with counts, keeping everything depends on the image's size (counts() then keeps all)
        return self.keep_ratio == 1.0

    def counts(self, n: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of an image (tile) with ``n`` patches; raises when the
        contextual tokens do not fit."""
        if self.keep_ratio is not None:
            k = max(1, min(n, int(round(self.keep_ratio * n))))
            if k == n:
                return n, 0
            contextual = min(k - 1, int(round(k * self.contextual / (self.dominant + self.contextual))))
            return k - contextual, contextual
        if self.contextual == 0:
            return min(self.dominant, n), 0
        if self.dominant + self.contextual > n:
            raise ConfigError(
                f"VisionZip: dominant + contextual = {self.dominant} + {self.contextual} is more than an image "
                f"(tile) of this input has ({n} visual tokens); allowed: dominant + contextual <= {n}, or "
                "contextual=0 to keep min(dominant, n)"
            )
        return self.dominant, self.contextual

    def check_adapter(self, adapter) -> None:
        super().check_adapter(adapter)
        if adapter.tower == "patches":
            return
        if adapter.tower != "cls":
            raise UnsupportedModelError(
                f"VisionZip: the vision tower of {type(adapter.model).__name__} has no CLS token (e.g. SigLIP), "
                "whose attention VisionZip ranks by; supported: towers with a CLS token (CLIP: LLaVA-1.5, "
                "LLaVA-NeXT) and towers of merged patches (Qwen2-VL, Qwen2.5-VL)"
            )
        try:
            layer, _ = adapter.feature_layer()
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"VisionZip: {err}") from None
        n = len(adapter.vision_layers)
        if layer < 0:
            raise UnsupportedModelError(
                f"VisionZip: the image features are the vision tower's embeddings (before its {n} layers): "
                "there is no attention to read; it needs features from a layer before the last"
            )
        if layer >= n - 1:
            raise UnsupportedModelError(
                f"VisionZip: the image features are the output of the vision tower's last layer ({layer} of "
                f"0..{n - 1}); VisionZip reads them at the next layer's input, so it needs a feature layer "
                "before the last"
            )

    def plan(self, adapter) -> list:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"
        if adapter.tower == "patches":
            return self._plan_patches(adapter, compact)
        layer, has_cls = adapter.feature_layer()

        def attention(vctx):
            with torch.no_grad():
                q, k, scale = adapter.cls_query_key(vctx.layer, vctx.hidden.detach())
                probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, -1)  # [S, H, 1, N]
            vctx.store["visionzip_cls"] = probs[:, :, 0].sum(1)  # [S, N]
            vctx.store["visionzip_keys"] = k.float().mean(1)  # [S, N, Dh]

        def features(vctx):
            vctx.store["visionzip_hidden"] = vctx.hidden  # the feature layer's output

        def select(ctx):
            return self._select_cls(ctx, adapter, has_cls, compact)

        return [Vision(layer, attention), Vision(layer + 1, features), Step(0, select)]

    # --- the shared rule -------------------------------------------------------------------------------
    def _zip(self, score: torch.Tensor, keys: torch.Tensor, n: int, protected: torch.Tensor):
        """Of ``n`` tokens with CLS-attention (or importance) ``score`` and merge keys ``keys`` [n, Dh]:
        (dominant positions, contextual targets, the others, the target each other joins). ``protected``:
        positions kept as dominant on top of the ranking (the CLS feature)."""
        d_keep, c_keep = self.counts(n)
        free = torch.ones(n, dtype=torch.bool, device=score.device)
        free[protected] = False
        candidates = free.nonzero()[:, 0]
        ranked = torch.sort(_quantise(score[candidates]), descending=True, stable=True).indices
        dominant = torch.cat([protected, candidates[ranked[: d_keep - len(protected)]]])
        free[dominant] = False
        rest = free.nonzero()[:, 0]
        if c_keep == 0 or len(rest) == 0:
            empty = rest[:0]
            return dominant, empty, empty, empty
        targets = rest[:: max(1, len(rest) // c_keep)][:c_keep]
        others = rest[~torch.isin(rest, targets)]
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        joined = _quantise(unit[others] @ unit[targets].T).argmax(-1)  # ties: the first target
        return dominant, targets, others, joined

    @staticmethod
    def _merge(features: torch.Tensor, targets, others, joined) -> torch.Tensor:
        """The reference's contextual tokens: each target plus the mean of the tokens that joined it (an
        empty target stays itself)."""
        feats = features.float()
        sums = torch.zeros(len(targets), feats.shape[-1], device=feats.device).index_add_(
            0, joined, feats[others]
        )
        sizes = torch.bincount(joined, minlength=len(targets)).clamp_min(1)[:, None]
        return feats[targets] + sums / sizes

    def _finish(self, ctx, keep, new, merged_any, cost, compact):
        ctx.add_cost("VisionZip selection", cost)
        s = ctx.state
        last = ctx.last_prompt_slot()
        keep |= (s.slots == last) & (last >= 0)  # generation continues from it
        return Keep(keep, compact=compact, hidden=new if merged_any else None)

    # --- towers with a CLS token (CLIP: LLaVA, LLaVA-NeXT) ---------------------------------------------------------------
    def _select_cls(self, ctx, adapter, has_cls: bool, compact: bool):
        s, hidden = ctx.state, ctx.hidden
        store = ctx.vision
        if "visionzip_hidden" not in store:
            raise LeanVLMError(
                "VisionZip: the input has image tokens but the vision tower did not run in this forward "
                "(image features passed in precomputed?); VisionZip reads the tower, so pass pixel_values"
            )
        tower = store["visionzip_hidden"]
        cls_attn, keys = store["visionzip_cls"], store["visionzip_keys"]
        sources = adapter.feature_sources(ctx.tower_inputs, tower.shape[0])
        projector = adapter.model_shape(adapter.model.config).projector
        keep = ~s.visual
        new, merged_any = hidden.clone(), False
        cost = torch.zeros(hidden.shape[0], dtype=torch.long)
        per_sample = ctx.image_slots()
        # the tower ran on the images of the (original) samples in order
        starts = first_items([len(images) for images in per_sample], ctx.replicas)
        for b, images in enumerate(per_sample):
            for i, idx in enumerate(images.values()):
                g = starts[b] + i
                slots = torch.tensor(idx, device=hidden.device)
                source = sources[g].to(hidden.device) if g < len(sources) else None
                if source is None or len(source) != len(idx):
                    raise LeanVLMError(
                        f"VisionZip: image {g} of the batch has {len(idx)} visual tokens but the vision tower's "
                        f"layout gives {0 if source is None else len(source)}; the image inputs do not match"
                    )
                for seq in source[:, 0].unique().tolist():
                    here = source[:, 0] == seq
                    if seq < 0:  # LLaVA-NeXT's row newlines: kept only where the image loses nothing
                        keep[b, slots[here]] = bool((source[:, 0] >= 0).sum() <= self._kept_of(source))
                        continue
                    tokens = source[here, 1]
                    protected = (tokens == 0).nonzero()[:, 0] if has_cls else tokens[:0]  # the CLS feature
                    dominant, targets, others, joined = self._zip(
                        cls_attn[seq][tokens], keys[seq][tokens], len(tokens), protected
                    )
                    where = slots[here]
                    keep[b, where[dominant]] = True
                    keep[b, where[targets]] = True
                    if len(targets):
                        merged = self._merge(tower[seq][tokens], targets, others, joined)
                        new[b, where[targets]] = adapter.project(merged.to(tower.dtype)).to(new.dtype)
                        merged_any = True
                    cost[b] += self.cost(
                        tower.shape[1], tower.shape[-1], keys.shape[-1], len(others), len(targets), projector
                    )
        return self._finish(ctx, keep, new, merged_any, cost, compact)

    def _kept_of(self, source: torch.Tensor) -> int:
        """Tokens an image whose tokens come from ``source`` keeps (its newline tokens aside)."""
        return sum(
            sum(self.counts(int((source[:, 0] == seq).sum())))
            for seq in source[:, 0].unique().tolist()
            if seq >= 0
        )

    @staticmethod
    def cost(n: int, d: int, d_head: int, others: int, c: int, projector) -> int:
        """FLOPs of one CLIP tower sequence of ``n`` tokens of width ``d``: the CLS query and every key
        (recomputed from the layer's weights), the CLS scores, the head-mean keys; with ``c`` contextual
        tokens absorbing ``others`` patches: key norms, similarities, the sums and the projector."""
        flops = 2 * d * d + 2 * n * d * d + 2 * n * d + n * d
        if c:
            flops += 3 * n * d_head + 2 * others * c * d_head + (others + c) * d
            flops += c * sum(2 * a * b for a, b in projector)
        return flops

    def selection_flops(self, shape, images: list[int], text_tokens: int) -> int:
        v = shape.vision
        if v is None or not v.heads or not v.has_cls or not shape.visual_tokens_per_image:
            raise ConfigError(
                f"VisionZip: its cost on {shape.name} depends on each image's tiles or frames; it is counted "
                "from the trace (lv.last_report, leanvlm bench), not from a schedule"
            )
        total = 0
        for n in images:
            dom, ctx = self.counts(n)
            others = n - dom - ctx if ctx else 0
            total += self.cost(v.tokens, v.hidden, v.hidden // v.heads, others, ctx, shape.projector)
        return total

    # --- towers of merged patches, no CLS token (Qwen-VL; ours) -----------------------------------------------------------
    def _plan_patches(self, adapter, compact: bool) -> list:
        unit = adapter.merge_unit

        def observe(vctx):
            with torch.no_grad():
                q, k, k_plain, scaling, cu = adapter.patch_query_key(
                    vctx.layer, vctx.hidden.detach(), vctx.kwargs
                )
                received = attention_received(q.float(), k.float(), scaling, cu.tolist())
            kind, grid = adapter.tower_run(
                vctx.vision_inputs, vctx.hidden.shape[0], vctx.store.get("visionzip_frames", {})
            )
            importance = received.view(-1, unit).sum(-1)  # per merged token: its patches' sum
            keys = k_plain.float().mean(0).view(-1, unit, k_plain.shape[-1]).mean(1)
            index = adapter.window_index(grid)
            if index is not None:  # blocks see attention windows: back to raster order
                importance = torch.empty_like(importance).index_copy_(
                    0, index.to(importance.device), importance
                )
                keys = torch.empty_like(keys).index_copy_(0, index.to(keys.device), keys)
            width = vctx.hidden.shape[-1]
            frames, o = [], 0
            for t, h, w in grid.tolist():
                m = h * w // unit
                for _ in range(t):
                    p = m * unit  # the frame's patches: the fused q/k/v recomputed, the scores, the key means
                    flops = 6 * p * width * width + 2 * p * p * width + p * width
                    frames.append((importance[o : o + m], keys[o : o + m], flops))
                    o += m
            vctx.store.setdefault("visionzip_frames", {})[kind] = frames

        def select(ctx):
            return self._select_patches(ctx, adapter, compact)

        return [Vision(adapter.attention_block(), observe), Step(0, select)]

    def _select_patches(self, ctx, adapter, compact: bool):
        s, hidden = ctx.state, ctx.hidden
        frames = ctx.vision.get("visionzip_frames")
        if not frames:
            raise LeanVLMError(
                "VisionZip: the input has image tokens but the vision tower did not run in this forward "
                "(image features passed in precomputed?); VisionZip reads the tower, so pass pixel values"
            )
        ids = ctx.vision_inputs.get("input_ids") if ctx.vision_inputs.get("has_input_ids") else None
        keep = ~s.visual
        new, merged_any = hidden.clone(), False
        cost = torch.zeros(hidden.shape[0], dtype=torch.long)
        per_sample = [
            [
                (adapter.visual_kind(None if ids is None else ids[b, s.orig[b, idx[0]]], frames), idx)
                for idx in images.values()
            ]
            for b, images in enumerate(ctx.image_slots())
        ]
        # each kind's frames come in the order of the (original) samples
        starts = {
            kind: first_items([sum(k == kind for k, _ in spans) for spans in per_sample], ctx.replicas)
            for kind in frames
        }
        for b, spans in enumerate(per_sample):
            seen = dict.fromkeys(frames, 0)
            for kind, idx in spans:
                slots = torch.tensor(idx, device=hidden.device)
                g = starts[kind][b] + seen[kind]
                seen[kind] += 1
                record = frames[kind][g] if g < len(frames[kind]) else None
                if record is None or len(record[0]) != len(idx):
                    raise LeanVLMError(
                        f"VisionZip: an {kind} of sample {b} has {len(idx)} visual tokens but the vision tower "
                        f"gave {0 if record is None else len(record[0])}; the image inputs do not match"
                    )
                importance, keys, flops = record
                dominant, targets, others, joined = self._zip(importance, keys, len(idx), slots[:0])
                keep[b, slots[dominant]] = True
                keep[b, slots[targets]] = True
                if len(targets):
                    new[b, slots[targets]] = self._merge(hidden[b, slots], targets, others, joined).to(
                        new.dtype
                    )
                    merged_any = True
                # the tower's share, then key norms, similarities and the sums in the LLM's input space
                cost[b] += (
                    flops + 3 * len(idx) * keys.shape[-1] + 2 * len(others) * len(targets) * keys.shape[-1]
                )
                cost[b] += (len(others) + len(targets)) * hidden.shape[-1]
        return self._finish(ctx, keep, new, merged_any, cost, compact)

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        return [sum(sum(self.counts(n)) for n in images)] * num_layers

    @classmethod
    def bench_default(cls, num_layers: int) -> VisionZip:
        return cls(keep_ratio=64 / 576)  # the reference's 54 + 10 of 576, as a share of any model's tokens

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> VisionZip:
        if not 0 < budget <= 1:
            raise ConfigError(f"VisionZip: budget={budget} is outside (0, 1]")
        return cls(keep_ratio=budget)  # before the LLM every layer keeps the same share
