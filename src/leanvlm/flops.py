"""Analytic FLOPs and KV-cache bytes, per layer, from what each layer really processed.

Two conventions, always labelled:

* **real**: FLOPs of the whole prompt, 2 per multiply-add: attention projections (with grouped-query
  key/value heads), the attention scores and the weighted sum over the query-key pairs the causal
  mask allows (n(n+1)/2 in a prefill, what flash / sdpa kernels compute),
  the gated FFN (three matrices), the vision tower, the projector and the LM head (one position,
  as ``generate`` computes). Norms, activations, softmax and RoPE are not counted (they are linear
  in n and small).
* **paper**: PyramidDrop's convention (arXiv 2410.17247, Sec. 3.1), which later token-pruning papers
  quote: one per multiply-add, visual tokens only, LLM layers only, per layer
  ``4 n d^2 + 2 n^2 d + 3 n d m`` with n the visual tokens the layer processed. LLaVA-1.5-7B with 576
  visual tokens gives 3.82 TFLOPs, and 1.78 TFLOPs with PyramidDrop's default schedule.

"Equivalent tokens" is the layer-averaged visual-token count the token-pruning papers quote.

The per-layer counts come from an engine trace (:func:`from_trace`), so the numbers describe what
ran; :func:`schedule_counts` derives the same counts from a method's schedule without a model (for
``leanvlm flops`` on the meta device), and the tests check the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TextShape:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class VisionShape:
    """A ViT. ``tokens``: sequence length through the tower per image (patches + CLS), 0 when it
    depends on the image (then the caller passes the real sequence lengths)."""

    layers: int
    hidden: int
    intermediate: int
    tokens: int
    patch_size: int
    channels: int = 3
    temporal_patch: int = 1  # frames per patch (Qwen2-VL's 3-D patch embedding)
    mlp_matrices: int = 2  # 3 for a gated MLP
    has_cls: bool = True
    heads: int = 0  # attention heads (0: not known)
    #: the encoder layer whose output the image features are read from (0-based; None: not one layer)
    feature_layer: int | None = None


@dataclass(frozen=True)
class ModelShape:
    name: str
    text: TextShape
    vision: VisionShape | None
    #: (in, out) of each projector matrix, applied to every visual token
    projector: tuple[tuple[int, int], ...] = ()
    #: visual tokens one image contributes to the LLM (LLaVA-1.5: 576); 0 when variable
    visual_tokens_per_image: int = 0


# --- per-component formulas (real: 2 FLOPs per multiply-add) ----------------------------------------
def attention_projection_flops(t: TextShape, n: int) -> int:
    q_out, kv_out = t.heads * t.head_dim, t.kv_heads * t.head_dim
    return 2 * n * t.hidden * (q_out + 2 * kv_out) + 2 * n * q_out * t.hidden


def attention_score_flops(t: TextShape, n_q: int, n_kv: int, causal: bool = True) -> int:
    """QK^T and the weighted sum of V over the query-key pairs the mask allows.

    With ``causal`` the n_q queries are the last n_q of the n_kv keys, so a prefill has n(n+1)/2 pairs:
    the work flash / memory-efficient sdpa kernels do (eager attention computes the full square and
    masks it; ``causal=False`` counts that)."""
    pairs = n_q * n_kv - (n_q * (n_q - 1) // 2 if causal else 0)
    return 2 * 2 * pairs * t.heads * t.head_dim


def ffn_flops(t: TextShape, n: int) -> int:
    return 2 * 3 * n * t.hidden * t.intermediate


def vision_flops(
    v: VisionShape, tokens: int | None = None, layers: list[tuple[int, int]] | None = None
) -> int:
    """One sequence of ``tokens`` (default ``v.tokens``) through the tower: patch embedding + layers.
    ``layers``: per encoder layer, the tokens its attention and its MLP processed, where a method
    shortened the sequence inside the tower (default: ``tokens`` everywhere)."""
    n = v.tokens if tokens is None else tokens
    patches = n - 1 if v.has_cls else n
    embed = 2 * patches * v.channels * v.temporal_patch * v.patch_size**2 * v.hidden
    total = 0
    for attn, mlp in layers if layers is not None else [(n, n)] * v.layers:
        total += 2 * attn * 4 * v.hidden**2 + 2 * 2 * attn**2 * v.hidden
        total += 2 * v.mlp_matrices * mlp * v.hidden * v.intermediate
    return embed + total


def projector_flops(shape: ModelShape, n_visual: int) -> int:
    return sum(2 * n_visual * i * o for i, o in shape.projector)


def lm_head_flops(t: TextShape, positions: int = 1) -> int:
    return 2 * positions * t.hidden * t.vocab


def scoring_flops(t: TextShape, n_tokens: int, n_queries: int) -> int:
    """Ranking visual tokens by attention (FastV, PyramidDrop): keys for every token, queries for the
    query rows, and their scores. Not part of the model's own forward, so counted separately."""
    q_out, kv_out = t.heads * t.head_dim, t.kv_heads * t.head_dim
    return (
        2 * n_tokens * t.hidden * kv_out + 2 * n_queries * t.hidden * q_out + 2 * n_queries * n_tokens * q_out
    )


def split_layer_flops(t: TextShape, n: int, kv_only: int, extra: int) -> tuple[int, int, int]:
    """(attention projections, scores, FFN) of a layer where ``kv_only`` of its ``n`` tokens give only
    keys and values (norm + K/V projections) and ``extra`` more tokens are queries and keys (ProxyV's
    proxies, which see each other causally). The other queries are counted as seeing every key-only
    token and each other causally (an upper bound: text before an image sees none of it)."""
    q_out, kv_out = t.heads * t.head_dim, t.kv_heads * t.head_dim
    queries = n - kv_only + extra
    proj = 2 * queries * t.hidden * q_out * 2 + 2 * (n + extra) * t.hidden * 2 * kv_out
    m = n - kv_only
    pairs = m * kv_only + m * (m + 1) // 2 + extra * (extra + 1) // 2
    return proj, 2 * 2 * pairs * t.heads * t.head_dim, ffn_flops(t, queries)


def paper_layer_flops(t: TextShape, n_visual: int) -> int:
    """PyramidDrop's per-layer count: one per multiply-add, visual tokens only."""
    d, m = t.hidden, t.intermediate
    return 4 * n_visual * d**2 + 2 * n_visual**2 * d + 3 * n_visual * d * m


# --- reports -----------------------------------------------------------------------------------------
@dataclass
class LayerFlops:
    layer: int
    tokens: int
    visual: int
    attn_proj: int
    attn_scores: int
    ffn: int
    paper: int
    #: split layers (ProxyV): tokens that gave only keys and values, tokens beyond the sequence's own
    #: (queries and keys), FLOPs of the method's own modules
    kv_only: int = 0
    extra: int = 0
    module: int = 0

    @property
    def total(self) -> int:
        return self.attn_proj + self.attn_scores + self.ffn + self.module


@dataclass
class FlopsReport:
    """Per-sample prefill FLOPs, decode FLOPs and KV-cache bytes for one prompt."""

    shape: ModelShape
    layers: list[LayerFlops]
    images: int
    vision: int
    projector: int
    lm_head: int
    kv_bytes: int
    decode_flops_per_token: int
    dtype_bytes: int
    scoring: int = 0
    #: selection work outside the layers (e.g. DivPrune's distances)
    selection: int = 0
    #: visual tokens the projector produced (more than layer 0's after a method before the LLM)
    visual_in: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def llm(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def prefill_total(self) -> int:
        """Real FLOPs of the prefill: vision tower, projector, LLM layers, ranking, selection, LM head."""
        return self.vision + self.projector + self.llm + self.scoring + self.selection + self.lm_head

    @property
    def paper_total(self) -> int:
        return sum(layer.paper for layer in self.layers)

    @property
    def equivalent_tokens(self) -> float:
        return sum(layer.visual for layer in self.layers) / len(self.layers)

    def summary(self) -> dict:
        return {
            "prefill_flops": self.prefill_total,
            "llm_flops": self.llm,
            "vision_flops": self.vision + self.projector,
            "lm_head_flops": self.lm_head,
            "scoring_flops": self.scoring,
            "selection_flops": self.selection,
            "paper_flops": self.paper_total,
            "equivalent_tokens": round(self.equivalent_tokens, 2),
            "visual_tokens_in": self.layers[0].visual if self.visual_in is None else self.visual_in,
            "visual_tokens_last_layer": self.layers[-1].visual,
            "kv_bytes": self.kv_bytes,
            "decode_flops_per_token": self.decode_flops_per_token,
        }

    def table(self) -> str:
        """The per-layer table and totals in both conventions."""
        rows = [
            f"{'layer':>5} {'tokens':>7} {'visual':>7} {'attn proj':>11} {'attn scores':>12} {'ffn':>11} "
            f"{'total (real)':>13} {'paper':>11}"
        ]
        for lf in self.layers:
            rows.append(
                f"{lf.layer:>5} {lf.tokens:>7} {lf.visual:>7} {fmt_flops(lf.attn_proj):>11} "
                f"{fmt_flops(lf.attn_scores):>12} {fmt_flops(lf.ffn):>11} {fmt_flops(lf.total):>13} "
                f"{fmt_flops(lf.paper):>11}"
            )
        rows += [
            "",
            f"real FLOPs (2 per multiply-add, whole prompt): {fmt_flops(self.prefill_total)} = "
            f"vision tower + projector {fmt_flops(self.vision + self.projector)} ({self.images} image(s)) "
            f"+ LLM {fmt_flops(self.llm)} + ranking {fmt_flops(self.scoring)} + selection "
            f"{fmt_flops(self.selection)} + LM head {fmt_flops(self.lm_head)}",
            *self.notes,
            f"paper FLOPs (PyramidDrop convention: 1 per multiply-add, visual tokens, LLM layers): "
            f"{fmt_flops(self.paper_total)}",
            f"equivalent visual tokens (layer average): {self.equivalent_tokens:.1f}",
            f"KV cache after prefill: {self.kv_bytes / 2**20:.1f} MiB ({self.dtype_bytes}-byte elements)",
            f"decode, first new token: {fmt_flops(self.decode_flops_per_token)}",
        ]
        return "\n".join(rows)


def fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def report(
    shape: ModelShape,
    tokens_per_layer: list[int],
    visual_per_layer: list[int],
    *,
    images: int,
    dtype_bytes: int = 2,
    vision_sequences: list[int] | None = None,
    scoring: list[tuple[int, int]] = (),
    input_visual: int | None = None,
    selection: int = 0,
    layer_work: list[tuple[int, int, int]] | None = None,
    tower_layers: list[tuple[int, int]] | None = None,
) -> FlopsReport:
    """FLOPs of one sample's prefill given what each layer processed (tokens incl. visual).

    ``input_visual``: the visual tokens the projector produced (default: layer 0's; more when an
    input-stage method removed some before the LLM).

    ``vision_sequences``: the length of every sequence the vision tower ran (one per image, or per
    crop / tile); by default ``images`` sequences of the shape's fixed length.

    ``layer_work``: per layer, (key/value-only tokens, extra tokens, module FLOPs) of layers a method
    computes in a split form (:func:`split_layer_flops`); the paper convention counts such a layer as
    its extra tokens' full cost, the key/value projections of the others and half the module FLOPs.

    ``tower_layers``: per vision encoder layer, the tokens (per sequence) its attention and MLP processed
    when a method shortened the tower's sequence (:func:`vision_flops`)."""
    t = shape.text
    if len(tokens_per_layer) != t.num_layers or len(visual_per_layer) != t.num_layers:
        raise ValueError(
            f"expected {t.num_layers} per-layer counts, got {len(tokens_per_layer)} and {len(visual_per_layer)}"
        )
    layers = [
        LayerFlops(
            layer=i,
            tokens=n,
            visual=v,
            attn_proj=attention_projection_flops(t, n),
            attn_scores=attention_score_flops(t, n, n),
            ffn=ffn_flops(t, n),
            paper=paper_layer_flops(t, v),
        )
        for i, (n, v) in enumerate(zip(tokens_per_layer, visual_per_layer, strict=True))
    ]
    for lf, (kv_only, extra, module) in zip(layers, layer_work or (), strict=False):
        if kv_only or extra or module:
            lf.attn_proj, lf.attn_scores, lf.ffn = split_layer_flops(t, lf.tokens, kv_only, extra)
            lf.kv_only, lf.extra, lf.module = kv_only, extra, module
            lf.paper = paper_layer_flops(t, extra) + kv_only * 2 * t.hidden**2 + module // 2
    per_token = sum(
        attention_projection_flops(t, 1) + attention_score_flops(t, 1, n + 1) + ffn_flops(t, 1)
        for n in tokens_per_layer
    ) + lm_head_flops(t)
    if shape.vision is None:
        vision = 0
    elif vision_sequences is not None:
        vision = sum(vision_flops(shape.vision, n, tower_layers) for n in vision_sequences)
    else:
        vision = images * vision_flops(shape.vision, layers=tower_layers)
    return FlopsReport(
        shape=shape,
        layers=layers,
        images=images,
        vision=vision,
        projector=projector_flops(shape, visual_per_layer[0] if input_visual is None else input_visual),
        lm_head=lm_head_flops(t),
        kv_bytes=kv_cache_bytes(t, tokens_per_layer, dtype_bytes),
        decode_flops_per_token=per_token,
        dtype_bytes=dtype_bytes,
        scoring=sum(scoring_flops(t, n, q) for n, q in scoring),
        selection=selection,
        visual_in=input_visual,
    )


def kv_cache_bytes(t: TextShape, kv_per_layer: list[int], dtype_bytes: int) -> int:
    return sum(2 * n * t.kv_heads * t.head_dim * dtype_bytes for n in kv_per_layer)


def from_trace(
    shape: ModelShape,
    trace,
    sample: int = 0,
    *,
    images: int | None = None,
    dtype_bytes: int = 2,
    vision_sequences: list[int] | None = None,
):
    """The report for one sample of an engine trace (what each layer really processed)."""
    tokens = trace.tokens_per_layer[sample]
    visual = trace.visual_per_layer[sample]
    input_visual = int(trace.stages[0].visual[sample].sum())  # what the vision tower and projector made
    if images is None:
        per_image = shape.visual_tokens_per_image
        images = input_visual // per_image if per_image else len(vision_sequences or ())
    rep = report(
        shape,
        tokens,
        visual,
        images=images,
        dtype_bytes=dtype_bytes,
        vision_sequences=vision_sequences,
        scoring=trace.scoring_counts(sample),
        input_visual=input_visual,
        selection=trace.selection_flops(sample),
        layer_work=trace.layer_work_counts(sample),
        tower_layers=tower_layers_of(shape, trace),
    )
    if (
        shape.vision is not None
        and not shape.visual_tokens_per_image
        and vision_sequences is None
        and visual[0]
    ):
        rep.notes.append("vision tower not counted: its sequence lengths were not available for this sample")
    return rep


def tower_layers_of(shape: ModelShape, trace) -> list[tuple[int, int]] | None:
    """Per vision encoder layer, (attention, MLP) tokens per sequence from the trace (None: all in full)."""
    recorded = getattr(trace, "tower_tokens", None)
    if not recorded or shape.vision is None:
        return None
    full = (shape.vision.tokens, shape.vision.tokens)
    return [recorded.get(i, full) for i in range(shape.vision.layers)]


def schedule_tower(method, shape: ModelShape) -> list[tuple[int, int]] | None:
    """Per vision encoder layer, the (attention, MLP) tokens per sequence ``method`` declares (None: the
    tower runs in full)."""
    if method is None or method.is_noop or shape.vision is None:
        return None
    return method.tower_schedule(shape.vision)


def schedule_counts(
    method, num_layers: int, n_visual: int, n_text: int, shape: ModelShape | None = None
) -> tuple[list[int], list[int]]:
    """(tokens_per_layer, visual_per_layer) that ``method``'s schedule implies for one prompt with one
    image of ``n_visual`` tokens (what the method declares; the engine's trace is tested against it).
    A method that shortens the tower's sequence gets the tower's shape from ``shape``."""
    if method is None or method.is_noop:
        visual, extra = [n_visual] * num_layers, [0] * num_layers
    elif shape is not None and schedule_tower(method, shape) is not None:
        visual = method.visual_schedule(num_layers, [n_visual], vision=shape.vision)
        extra = method.extra_tokens(num_layers, [n_visual])
    else:
        visual, extra = (
            method.visual_schedule(num_layers, [n_visual]),
            method.extra_tokens(num_layers, [n_visual]),
        )
    return [n_text + v + e for v, e in zip(visual, extra, strict=True)], visual


def schedule_selection(method, shape: ModelShape, images: list[int], n_text: int) -> int:
    """FLOPs of the selection work ``method`` does outside the layers for one prompt whose images have
    ``images`` visual tokens each (a method that reads the instruction is counted with all ``n_text``
    text tokens: an upper bound)."""
    if method is None or method.is_noop:
        return 0
    return method.selection_flops(shape, images, n_text)


def schedule_scoring(method, tokens_per_layer: list[int], n_text: int) -> list[tuple[int, int]]:
    """(tokens, query rows) of each ranking step ``method``'s schedule implies for one prompt: a ranking
    on layer s's input sees what layer s-1 processed (before any edit at s)."""
    if method is None or method.is_noop:
        return []
    queries = 1 if getattr(method, "query", "last") == "last" else n_text
    return [
        (tokens_per_layer[s - 1] if s > 0 else tokens_per_layer[0], queries)
        for s in method.scoring_layers(len(tokens_per_layer))
    ]


def schedule_layer_work(method, shape: ModelShape, images: list[int]) -> list[tuple[int, int, int]] | None:
    """Per layer, what ``method`` computes in a split form for one prompt whose images have ``images``
    visual tokens each (:meth:`leanvlm.methods.base.Method.layer_work`; None when nothing is split)."""
    if method is None or method.is_noop:
        return None
    return method.layer_work(shape, images)


def dtype_size(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()
