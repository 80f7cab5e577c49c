"""Timing and accounting of methods on one model and one prompt.

Timing hygiene: warm-up runs are excluded, the device is synchronized around every timed region,
every configuration is measured in the same run with repeats interleaved across configurations
and the order rotated every round (so drift in machine load and order effects hit all alike), and medians are reported. Prefill, time to
first token and decode are measured separately:

* prefill: one forward over the prompt with a KV cache, logits for the last position only (timed
  ``prefill_per_round`` times per round);
* time to first token: ``generate(max_new_tokens=1)`` (vision tower + prefill + sampling);
* decode: ``(t(generate N) - t(generate 1)) / (N - 1)`` with ``min_new_tokens=N``.

Each row also reports how far its prefill timings disagreed (``prefill_ms_spread``: interquartile range
over median) and ``noisy`` when its speedup is not to be trusted: its own spread or the unmodified
model's is above ``NOISY_SPREAD`` (10%), as on a loaded machine.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import compat
from .. import flops as flops_mod
from ..api import apply


@dataclass
class BenchConfig:
    label: str
    methods: tuple | None  # None: the unmodified model (nothing applied); (): leanvlm with no method
    budget: str = ""

    @property
    def kind(self) -> str:
        if self.methods is None:
            return "unmodified"
        return "no method" if not self.methods else self.methods[0].name


@dataclass
class Settings:
    repeats: int = 5
    warmup: int = 1
    new_tokens: int = 24
    #: prefill timings per config per round (prefill is the headline number and the cheapest to repeat)
    prefill_per_round: int = 5


@dataclass
class Samples:
    prefill_ms: list[float] = field(default_factory=list)
    selection_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)  # t(generate N) - t(generate 1), per repeat
    peak_bytes: int | None = None  # None: not measured on this machine (see PeakMemory.unavailable)
    peak_note: str | None = None


#: a row whose prefill timings spread more than this (interquartile range / median) is ``noisy``
NOISY_SPREAD = 0.1


def spread(samples: list[float]) -> float | None:
    """The interquartile range of ``samples`` over their median (None with fewer than two samples)."""
    if len(samples) < 2:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    middle = statistics.median(samples)
    return (q3 - q1) / middle if middle > 0 else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_malloc_trim = None  # glibc's malloc_trim once looked up; False where there is none


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there is no
    such call (not glibc), so that the process RSS still counts memory freed earlier."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak, or on CPU the process RSS sampled
    every millisecond. On CPU, memory that earlier work freed stays in the process (the C heap keeps it for
    reuse), so the RSS would not grow for a run that reuses it and most runs would read 0: the heap's free
    pages are handed back first (glibc), and without glibc ``peak`` is None and ``unavailable`` says why."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = 0
        self.unavailable: str | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        if not release_free_memory():
            self.unavailable = (
                "peak memory on CPU needs glibc's malloc_trim (Linux): without it the process keeps the memory "
                "earlier runs freed and the RSS does not show what a run needs"
            )
        self._proc = psutil.Process()
        self._start = self._proc.memory_info().rss
        self._max = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._proc.memory_info().rss)
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak = None if self.unavailable else self._max - self._start


def _timed(fn: Callable, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _selection_ms(handle, prefill) -> list[float]:
    if handle is None:
        return []
    handle.engine.time_selection = True
    try:
        prefill()
    finally:
        handle.engine.time_selection = False
    return [handle.trace.selection_ms]


def measure(
    model,
    inputs,
    configs: list[BenchConfig],
    settings: Settings,
    shape,
    *,
    dtype_bytes: int,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run every config; returns one row per config (speedups relative to the first config)."""
    device = inputs["input_ids"].device
    n = settings.new_tokens
    gen = dict(do_sample=False, pad_token_id=model.generation_config.pad_token_id)

    def prefill():
        model(**inputs, use_cache=True, logits_to_keep=1)

    def first_token():
        model.generate(**inputs, max_new_tokens=1, **gen)

    def generate_n():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen)

    untrained = attach_untrained(model, configs)
    samples = {c.label: Samples() for c in configs}
    rounds = settings.warmup + settings.repeats
    with torch.inference_mode():
        for r in range(rounds):
            # rotate the order every round so that no config always runs first (or after the same one)
            shift = r % len(configs)
            for c in configs[shift:] + configs[:shift]:
                if progress:
                    progress(
                        f"{'warm-up' if r < settings.warmup else f'repeat {r - settings.warmup + 1}'}: {c.label}"
                    )
                handle = apply(model, *c.methods) if c.methods is not None else None
                try:
                    p = [_timed(prefill, device) for _ in range(settings.prefill_per_round)]
                    # one more prefill, timing the methods' own work before the LLM (this synchronises the
                    # device around it, so it is kept out of the timed ones)
                    selection = _selection_ms(handle, prefill)
                    t1 = _timed(first_token, device)
                    tn = _timed(generate_n, device)
                    mem = None
                    if r == rounds - 1:  # once, untimed: the CPU sampler thread would slow a timed run
                        mem = PeakMemory(device)
                        with mem:
                            generate_n()
                finally:
                    if handle is not None:
                        handle.remove()
                if r >= settings.warmup:
                    s = samples[c.label]
                    s.prefill_ms.extend(p)
                    s.selection_ms.extend(selection)
                    s.ttft_ms.append(t1)
                    s.decode_ms.append(tn - t1)
                    if mem is not None:
                        s.peak_bytes, s.peak_note = mem.peak, mem.unavailable
        rows = [_row(model, inputs, c, samples[c.label], settings, shape, dtype_bytes) for c in configs]
    for row in rows:
        row["untrained_modules"] = row["config"] in untrained
    base = rows[0]
    for row in rows:
        # a speedup is a ratio of two medians: it is as noisy as the noisier of the two rows
        row["noisy"] = any(
            r["prefill_ms_spread"] is not None and r["prefill_ms_spread"] > NOISY_SPREAD for r in (row, base)
        )
        row["speedup"] = round(base["prefill_ms"] / row["prefill_ms"], 3)
        row["ttft_speedup"] = round(base["ttft_ms"] / row["ttft_ms"], 3)
        both = row["decode_tok_s"] and base["decode_tok_s"]
        row["decode_speedup"] = round(row["decode_tok_s"] / base["decode_tok_s"], 3) if both else None
        row["flops_ratio"] = round(row["prefill_flops"] / base["prefill_flops"], 4)
        row["paper_flops_ratio"] = (
            round(row["paper_flops"] / base["paper_flops"], 4) if base["paper_flops"] else None
        )
        row["analytic_speedup"] = round(1 / row["flops_ratio"], 3)
        row["speedup_vs_analytic"] = round(row["speedup"] / row["analytic_speedup"], 3)
    return rows


def attach_untrained(model, configs: list[BenchConfig]) -> set[str]:
    """Attach freshly initialised modules for the trainable methods whose modules the model lacks (their
    timing and FLOPs are those of trained ones; their outputs are not); returns those configs' labels."""
    from ..modules import attached, prepare

    labels, fresh = set(), set()
    for c in configs:
        for m in c.methods or ():
            registry = attached(model)
            if m.trainable and m.requires_modules and (registry is None or m.module_key() not in registry):
                prepare(model, m)
                fresh.add(m.module_key())
            if m.trainable and m.module_key() in fresh:
                labels.add(c.label)
    return labels


def _row(model, inputs, config: BenchConfig, s: Samples, settings: Settings, shape, dtype_bytes: int) -> dict:
    """Accounting from one more (untimed) prefill with the config applied: the trace and the real cache."""
    handle = apply(model, *(config.methods or ()))
    try:
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        trace = handle.trace
    finally:
        handle.remove()
    kv_measured = sum(
        (keys.numel() + values.numel()) * keys.element_size()
        for keys, values in compat.layer_tensors(compat.output_cache(out))
    )
    report = flops_mod.from_trace(
        shape, trace, dtype_bytes=dtype_bytes, vision_sequences=handle.adapter.vision_sequences(inputs)
    )
    prefill_ms = statistics.median(s.prefill_ms)
    selection_ms = statistics.median(s.selection_ms) if s.selection_ms else 0.0
    ttft_ms = statistics.median(s.ttft_ms)
    decode_ms = statistics.median(s.decode_ms)
    visual = trace.visual_per_layer[0]
    return {
        "config": config.label,
        "method": config.kind,
        "budget": config.budget,
        "settings": None if not config.methods else config.methods[0].describe(),
        "visual_tokens_in": report.summary()["visual_tokens_in"],
        "visual_tokens_kept": visual[-1],
        "equivalent_tokens": round(report.equivalent_tokens, 2),
        "prefill_flops": report.prefill_total,
        "paper_flops": report.paper_total,
        "prefill_ms": round(prefill_ms, 3),
        "prefill_ms_min": round(min(s.prefill_ms), 3),
        # interquartile range / median of the prefill timings: how far the repeats disagreed
        "prefill_ms_spread": None if (rel := spread(s.prefill_ms)) is None else round(rel, 4),
        # the methods' own work before the LLM (selection), timed in separate prefills, and its share
        "selection_ms": round(selection_ms, 3),
        "selection_share": round(selection_ms / prefill_ms, 4) if prefill_ms > 0 else None,
        "selection_flops": report.selection,
        "ttft_ms": round(ttft_ms, 3),
        # None when timing noise exceeded the decode time itself (too few new tokens for this machine)
        "decode_tok_s": round((settings.new_tokens - 1) / (decode_ms / 1e3), 3) if decode_ms > 0 else None,
        "peak_mem_mib": None if s.peak_bytes is None else round(s.peak_bytes / 2**20, 2),
        "peak_mem_note": s.peak_note,
        "kv_bytes": kv_measured,
        "kv_bytes_analytic": report.kv_bytes,
        "visual_per_layer": visual,
    }
