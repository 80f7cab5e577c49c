"""The token set a decoder layer sees, and what each stage's KV cache holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: what a slot holds (``TokenState.kind``)
TEXT, VISUAL, POOLED, INSERTED = 0, 1, 2, 3
KIND_NAMES = ("text", "visual", "pooled", "inserted")


def expand_positions(position_ids: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """Position ids as [..., B, n] (1-D RoPE: [B, n]; M-RoPE: [R, B, n])."""
    if position_ids is None:
        position_ids = torch.arange(n, device=device)[None]
    return position_ids.expand(*position_ids.shape[:-2], batch, n)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, n, D], index: [B, m] -> [B, m, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pos: [..., B, n], index: [B, m] -> [..., B, m]."""
    return pos.gather(-1, index.expand(*pos.shape[:-2], *index.shape))


@dataclass
class TokenState:
    """What the current layer sees, per slot of the (possibly edited) sequence.

    orig:    [B, n] index of the slot's token in the call's input sequence (an inserted token: the
             token it was inserted after, or 0 when inserted in front)
    base:    [B, n] index of the slot in the sequence the model's layer 0 received (what the model's
             own mask and positions are indexed by; equals ``orig`` unless an input-stage edit ran)
    order:   [B, n] causal order: a slot attends to slots of lower or equal order (increasing along
             the slots: the original index until tokens are inserted, the slot number after)
    valid:   [B, n] a real token (False for the model's padding and for filler slots added in front of
             samples that keep fewer tokens than others)
    kind:    [B, n] TEXT, VISUAL, POOLED (a merge of several visual tokens) or INSERTED
    pos:     [..., B, n] RoPE position ids the layer uses (original or compacted)
    cos/sin: [B, n, Dh] rotary tables for ``pos`` (None before the first decoder layer)
    shift:   [B] real tokens dropped so far (compact positions of later tokens are original - shift)
    """

    orig: torch.Tensor
    base: torch.Tensor
    order: torch.Tensor
    valid: torch.Tensor
    kind: torch.Tensor
    pos: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    shift: torch.Tensor

    @classmethod
    def initial(cls, valid: torch.Tensor, visual: torch.Tensor, pos: torch.Tensor) -> TokenState:
        b, n = valid.shape
        orig = torch.arange(n, device=valid.device).expand(b, n)
        kind = torch.where(visual, VISUAL, TEXT).to(torch.int8)
        zeros = torch.zeros(b, dtype=torch.long, device=valid.device)
        return cls(orig, orig, orig, valid, kind, pos, None, None, zeros)

    @property
    def visual(self) -> torch.Tensor:
        """[B, n] real slots that carry image content (visual or pooled)."""
        return ((self.kind == VISUAL) | (self.kind == POOLED)) & self.valid

    @property
    def inserted(self) -> torch.Tensor:
        return (self.kind == INSERTED) & self.valid

    @property
    def slots(self) -> torch.Tensor:
        """[B, n] slot numbers 0..n-1."""
        return torch.arange(self.orig.shape[1], device=self.orig.device).expand_as(self.orig)

    def select(self, index: torch.Tensor, present: torch.Tensor, *, pos, cos, sin, shift) -> TokenState:
        """The state of the slots ``index`` [B, m] (``present`` False for filler slots)."""
        return TokenState(
            orig=self.orig.gather(1, index),
            base=self.base.gather(1, index),
            order=self.order.gather(1, index),
            valid=self.valid.gather(1, index) & present,
            kind=self.kind.gather(1, index),
            pos=pos,
            cos=cos,
            sin=sin,
            shift=shift,
        )


@dataclass
class KVMap:
    """What the KV cache of one stage's layers holds: original index and validity of every entry."""

    orig: torch.Tensor  # [B, K]
    valid: torch.Tensor  # [B, K]
    shift: torch.Tensor  # [B]

    def trimmed(self, cut: int) -> KVMap:
        """The map after the cache lost its last ``cut`` entries."""
        k = self.orig.shape[1] - cut
        return KVMap(self.orig[:, :k], self.valid[:, :k], self.shift)

    def extended(self, new_orig: torch.Tensor, new_valid: torch.Tensor) -> KVMap:
        return KVMap(torch.cat([self.orig, new_orig], -1), torch.cat([self.valid, new_valid], -1), self.shift)


@dataclass
class KVRecord:
    """What a cache filled through a reduced prefill holds (kept on the cache object itself).

    n_cached: entries of layer 0 when recorded; n_orig: tokens of the original sequence they stand for;
    n_prompt: the prompt's length (original coordinates); layout: the layers where stages begin;
    kvmaps: one map per stage; next_pos: [B] the position id the next token takes (input-stage
    reductions, whose layer 0 is shortened, so the model can not count it from the cache)."""

    n_cached: int
    n_orig: int
    n_prompt: int
    layout: tuple[int, ...]
    kvmaps: list[KVMap]
    next_pos: torch.Tensor | None = None
    pos_rows: int = 0  # M-RoPE: the rows of position ids (0: one row, [B, n])

    def cropped(self, past_len: int) -> KVRecord:
        """The record after the cache was cropped to ``past_len`` entries (rejected draft tokens, a rolled
        back turn): the last entries of every layer are the tokens after the prompt, never edited."""
        from ..errors import LeanVLMError

        if past_len > self.n_cached:
            raise LeanVLMError(
                f"the KV cache holds {past_len} tokens but only {self.n_cached} went in through leanvlm's "
                "hooks; a cache filled by a reduced prefill must only grow through the same model"
            )
        cut = self.n_cached - past_len
        if self.n_orig - cut < self.n_prompt:
            raise LeanVLMError(
                f"the KV cache was cropped to {past_len} entries, into the reduced {self.n_prompt}-token "
                "prompt; run the prefill again"
            )
        last = self.kvmaps[-1]
        gone = last.valid[:, last.valid.shape[1] - cut :].sum(-1)
        return KVRecord(
            n_cached=past_len,
            n_orig=self.n_orig - cut,
            n_prompt=self.n_prompt,
            layout=self.layout,
            kvmaps=[m.trimmed(cut) for m in self.kvmaps],
            next_pos=None if self.next_pos is None else self.next_pos - gone.to(self.next_pos.device),
            pos_rows=self.pos_rows,
        )
