"""The bench: how much each registered method saves on a model, and what it costs."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import torch
import transformers

from ..errors import ConfigError
from ..hardware import describe_hardware
from ..methods.spec import get_method, resolve_method
from ..registry import METHODS
from .runner import BenchConfig, Settings, measure

__all__ = [
    "BenchConfig",
    "Settings",
    "build_configs",
    "format_table",
    "measure",
    "plot",
    "result_document",
    "timing_notes",
]


def parse_budgets(text: str) -> list[str]:
    items = [b.strip() for b in text.split(",") if b.strip()]
    if not items:
        raise ConfigError("--budgets is empty; give e.g. 'default,0.5'")
    for b in items:
        if b == "default":
            continue
        try:
            value = float(b)
        except ValueError:
            raise ConfigError(f"--budgets item {b!r} is neither 'default' nor a number in (0, 1]") from None
        if not 0 < value <= 1:
            raise ConfigError(f"--budgets item {b!r} is outside (0, 1]")
    return items


def build_configs(
    method_names: list[str] | None,
    budgets: list[str],
    num_layers: int,
    skipped: list | None = None,
    specs: list[str] = (),
) -> list[BenchConfig]:
    """The unmodified model, leanvlm with no method, then every method at every budget.

    A numeric budget is the share of visual tokens kept on average over the layers (equal budgets
    mean about equal FLOPs); "default" is each method's reference setting. A budget a method can not
    reach on this model raises ConfigError, or, given a ``skipped`` list, is left out and recorded there
    as (label, reason); if every method's rows are left out, ConfigError is raised all the same.

    ``specs``: method specs (``NAME:key=value,...``) run as given, once each, after the budgets' rows
    (with specs and no ``method_names``, only the specs run).
    """
    configs = [BenchConfig("none (unmodified model)", None), BenchConfig("none (leanvlm, no method)", ())]
    if method_names:
        classes = [get_method(n) for n in method_names]
    else:
        classes = [] if specs else [METHODS[k] for k in sorted(METHODS)]
    reasons = []
    for cls in classes:
        for budget in budgets:
            label = f"{cls.name} @ {budget}"
            try:
                method = (
                    cls.bench_default(num_layers)
                    if budget == "default"
                    else cls.at_budget(float(budget), num_layers)
                )
                method.check_model(num_layers)
            except ConfigError as err:
                if skipped is None:
                    raise
                reasons.append((label, str(err)))
                continue
            configs.append(BenchConfig(label, (method,), budget))
    for spec in specs:
        method = resolve_method(spec, num_layers)
        if method is None:
            raise ConfigError(f"--method {spec!r}: 'none' is measured anyway (the first two rows)")
        method.check_model(num_layers)
        configs.append(BenchConfig(spec, (method,), "spec"))
    if reasons and len(configs) == 2:
        raise ConfigError(reasons[0][1] if len(reasons) == 1 else "; ".join(r for _, r in reasons))
    if skipped is not None:
        skipped.extend(reasons)
    return configs


COLUMNS = [
    ("config", "config", "{}"),
    ("visual_tokens_kept", "visual kept", "{}"),
    ("equivalent_tokens", "equiv. tok", "{:.1f}"),
    ("prefill_flops", "prefill FLOPs", None),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("selection_ms", "select ms", "{:.2f}"),
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("peak_mem_mib", "peak MiB", "{:.1f}"),
    ("kv_bytes", "KV MiB", None),
    ("speedup", "speedup", "{:.2f}x"),
    ("flops_ratio", "FLOPs ratio", "{:.3f}"),
]


def format_table(rows: list[dict]) -> str:
    from ..flops import fmt_flops

    def cell(row, key, fmt):
        if key == "prefill_flops":
            return fmt_flops(row[key])
        if row[key] is None:
            return "n/a"
        if key == "kv_bytes":
            return f"{row[key] / 2**20:.1f}"
        if key == "speedup" and row.get("noisy"):
            return fmt.format(row[key]) + "?"  # see timing_notes
        return fmt.format(row[key])

    table = [[title for _, title, _ in COLUMNS]] + [[cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def timing_notes(rows: list[dict]) -> list[str]:
    """Lines to print under the table: how noisy the timings were (the speedups marked ``?``), and why a
    peak-memory column reads n/a."""
    from .runner import NOISY_SPREAD

    lines = []
    spreads = [(r["prefill_ms_spread"], r["config"]) for r in rows if r.get("prefill_ms_spread") is not None]
    over = [config for value, config in spreads if value > NOISY_SPREAD]
    if any(r.get("noisy") for r in rows) and spreads:
        worst, where = max(spreads)
        base = rows[0].get("prefill_ms_spread")
        lines.append(
            f"noisy timing: the prefill times of {len(over)} of {len(rows)} rows spread by more than "
            f"{NOISY_SPREAD:.0%} (interquartile range / median; up to {worst:.0%} in '{where}'"
            + (f", {base:.0%} for '{rows[0]['config']}'" if base is not None else "")
            + "), so the speedups marked ? are not reliable: rerun on an idle machine, with more --repeats"
        )
    if len(rows) > 1 and all(r.get("prefill_ms_spread") is None for r in rows):
        lines.append(
            "timing spread unknown: one prefill per row; rerun with more --repeats to see how noisy it is"
        )
    notes = sorted(
        {r["peak_mem_note"] for r in rows if r.get("peak_mem_mib") is None and r.get("peak_mem_note")}
    )
    lines += [f"peak MiB n/a: {note}" for note in notes]
    return lines


def result_document(
    rows, *, model_label, shape, inputs, settings: Settings, device, dtype, attn, argv, skipped=()
) -> dict:
    return {
        "benchmark": "leanvlm bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": argv,
        "model": model_label,
        "shape": dataclasses.asdict(shape),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "visual_tokens": rows[0]["visual_tokens_in"],
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "attn": attn,
        "settings": dataclasses.asdict(settings),
        "hardware": describe_hardware(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "flops_convention": "prefill_flops: real, 2 per multiply-add, whole prompt incl. vision tower; "
        "paper_flops: PyramidDrop's, 1 per multiply-add, visual tokens, LLM layers",
        "rows": rows,
        "skipped": [{"config": label, "reason": reason} for label, reason in skipped],
    }


def plot(rows: list[dict], path: str | Path, title: str) -> None:
    """PNG of measured prefill speedup against the FLOPs ratio, with the ideal curve speedup = 1/ratio.

    One colour per method and one marker per setting (each budget, the methods' defaults, each
    --method spec), explained by one legend beside the plot (no labels on the points, so none overlap);
    the two reference rows have markers of their own, and methods run with untrained modules hollow
    ones."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ConfigError("--plot needs matplotlib: pip install 'leanvlm[viz]'") from err

    points = [r for r in rows if r.get("flops_ratio") is not None and r.get("speedup") is not None]
    # the reference rows: (colour, marker, size, label)
    references = {
        "unmodified": ("black", "D", 110, "unmodified model"),
        "no method": ("0.6", "X", 60, "leanvlm, no method"),
    }
    palette = [
        *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"),
        *("#000080", "#e6ab02", "#008080", "#800000", "#7fbf7f", "#ff9896", "#c5b0d5"),
    ]
    markers = ["o", "s", "^", "v", "P", "<", ">", "h", "p", "*", "d", "8"]

    def setting(r) -> str:
        budget = str(r.get("budget", ""))
        if budget == "default":
            return "the method's default"
        return r["config"] if budget == "spec" else f"budget {budget}"

    methods = list(dict.fromkeys(r["method"] for r in points))
    others = [m for m in methods if m not in references]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(others)}
    reduced = [r for r in points if r["method"] not in references]
    budgets = sorted(
        {str(r.get("budget")) for r in reduced if setting(r).startswith("budget ")}, key=lambda b: -float(b)
    )
    settings = ["the method's default", *[f"budget {b}" for b in budgets]]
    settings += [r["config"] for r in reduced if str(r.get("budget")) == "spec"]
    settings = [s for s in dict.fromkeys(settings) if any(setting(r) == s for r in reduced)]
    marker = {s: markers[i % len(markers)] for i, s in enumerate(settings)}
    untrained = {r["method"] for r in points if r.get("untrained_modules")}

    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=100, layout="constrained")
    ratios = [r["flops_ratio"] for r in points] or [1.0]
    lo = max(min(ratios) * 0.9, 0.01)
    xs = [lo + (1.05 - lo) * i / 100 for i in range(101)]
    (ideal,) = ax.plot(xs, [1 / x for x in xs], color="0.55", linestyle="--", zorder=1)
    for r in points:
        if r["method"] in references:
            c, m, size, _ = references[r["method"]]
            ax.scatter(r["flops_ratio"], r["speedup"], s=size, marker=m, color=c, zorder=4)
            continue
        c, m = colour[r["method"]], marker[setting(r)]
        hollow = r["method"] in untrained
        ax.scatter(
            r["flops_ratio"],
            r["speedup"],
            s=60,
            marker=m,
            facecolors="none" if hollow else c,
            edgecolors=c if hollow else "white",
            linewidths=1.6 if hollow else 0.6,
            alpha=0.9,
            zorder=3,
        )
    ax.set_xlabel("prefill FLOPs ratio (method / unmodified)")
    ax.set_ylabel("measured prefill speedup")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)

    def header(text):
        return Line2D([], [], linestyle="none", label=text)

    handles = [header("method (colour)")]
    for m in methods:
        if m in references:
            c, mk, size, label = references[m]
            handles.append(
                Line2D([], [], linestyle="none", marker=mk, markersize=size**0.5, color=c, label=label)
            )
        else:
            label = m + (" (untrained modules: hollow)" if m in untrained else "")
            handles.append(Patch(facecolor=colour[m], edgecolor="none", label=label))
    if settings:
        handles += [header(" "), header("setting (marker)")]
    for s in settings:
        handles.append(Line2D([], [], linestyle="none", marker=marker[s], markersize=8, color="0.3", label=s))
    handles += [
        header(" "),
        Line2D([], [], color=ideal.get_color(), linestyle="--", label="ideal: speedup = 1 / FLOPs ratio"),
    ]
    legend = fig.legend(
        handles=handles,
        loc="outside right upper",
        fontsize=9,
        ncols=1 if len(handles) <= 28 else 2,
        frameon=False,
        handletextpad=0.6,
    )
    for text in legend.get_texts():
        if text.get_text() in ("method (colour)", "setting (marker)"):
            text.set_fontweight("bold")
    fig.savefig(path)
    plt.close(fig)


def write_json(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
