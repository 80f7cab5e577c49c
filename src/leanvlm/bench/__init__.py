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

__all__ = ["BenchConfig", "Settings", "build_configs", "format_table", "measure", "plot", "result_document"]


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
    """PNG of measured prefill speedup against the FLOPs ratio, with the ideal curve speedup = 1/ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError("--plot needs matplotlib: pip install 'leanvlm[viz]'") from err
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ratios = [r["flops_ratio"] for r in rows]
    lo = max(min(ratios) * 0.9, 0.01)
    xs = [lo + (1.05 - lo) * i / 100 for i in range(101)]
    ax.plot(xs, [1 / x for x in xs], color="0.6", linestyle="--", label="ideal: speedup = 1 / FLOPs ratio")
    for r in rows:
        ax.scatter(r["flops_ratio"], r["speedup"], s=40)
        ax.annotate(
            r["config"],
            (r["flops_ratio"], r["speedup"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    ax.set_xlabel("prefill FLOPs ratio (method / unmodified)")
    ax.set_ylabel("measured prefill speedup")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
