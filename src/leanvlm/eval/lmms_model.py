"""The lmms-eval model behind ``--model leanvlm``: any supported VLM with any method.

``python -m lmms_eval eval --model leanvlm --model_args pretrained=PATH_OR_ID,method=pyramiddrop,layers=[8,16,24]``

Every ``--model_args`` key that is not a loading option below is an argument of the method, parsed
and validated exactly as the Python API does (same errors). Loading options: ``pretrained``,
``method`` (a registered name or ``none``), ``dtype`` (default float32 on CPU, bfloat16 on GPU),
``attn`` (sdpa, eager, flash_attention_2), ``max_new_tokens`` (default when a task sets none),
``stats_path`` (the sidecar JSON, default ``leanvlm_eval_stats.json``). The batch size and device
come from lmms-eval's own ``--batch_size`` and ``--device``.

Besides the task scores lmms-eval writes, the sidecar records per sample and on average the visual
tokens kept, the layer-averaged visual tokens, the prefill FLOPs (real convention, from the engine's
trace) and the prefill / decode time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .. import flops as flops_mod
from ..api import apply
from ..errors import ConfigError, LeanVLMError
from ..loading import attach_saved_modules, chat_inputs, load_pretrained
from ..methods.spec import build_method, parse_value, resolve_build
from ..registry import find_adapter


class PrefillTimer:
    """Times the first forward of each ``generate`` call (the prefill); the rest is decode."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.prefill_ms: float | None = None
        self._start = 0.0

    def __enter__(self):
        self.prefill_ms = None
        self._handles = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, module, args):
        if self.prefill_ms is None:
            self._sync()
            self._start = time.perf_counter()

    def _post(self, module, args, output):
        if self.prefill_ms is None:
            self._sync()
            self.prefill_ms = (time.perf_counter() - self._start) * 1e3


class LeanVLMEval(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        device: str = "cpu",
        dtype: str | None = None,
        attn: str = "sdpa",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        stats_path: str = "leanvlm_eval_stats.json",
        **method_args,
    ) -> None:
        super().__init__()
        # the method first: a bad argument fails before a model is loaded, with the API's own message
        method_args = {k: parse_value(v) if isinstance(v, str) else v for k, v in method_args.items()}
        self.method = build_method(str(method), method_args)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(
                f"batch_size={batch_size!r} must be a whole number >= 1 ('auto' is not supported)"
            )
        self.batch_size_per_gpu = int(batch_size)
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: CUDA is not available on this machine")
        dtype = dtype or ("float32" if self._device.type == "cpu" else "bfloat16")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={dtype!r} is not one of float32, bfloat16, float16")
        self.model, self.processor = load_pretrained(
            pretrained, dtype=getattr(torch, dtype), device=str(self._device), attn_implementation=attn
        )
        # the method's defaults for this model's depth, the arguments given on top (as every command)
        self.method = resolve_build(str(method), method_args, find_adapter(self.model).num_layers)
        attach_saved_modules(self.model, pretrained, [self.method])  # trained modules saved beside it
        if self.method is not None:  # the setting that runs, said once (defaults follow the model's depth)
            print(f"leanvlm: method {method} -> {self.method.describe()}", file=sys.stderr)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.handle = apply(self.model, *([self.method] if self.method else []))
        self.shape = type(self.handle.adapter).model_shape(self.model.config)

        self.max_new_tokens = int(max_new_tokens)
        self.stats_path = Path(stats_path)
        self.samples: list[dict] = []
        self.label = {
            "pretrained": pretrained,
            "method": "none" if self.method is None else self.method.describe(),
            "device": str(self._device),
            "dtype": dtype,
            "attn": attn,
            "batch_size": self.batch_size_per_gpu,
        }

    # --- what lmms-eval reads ----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    # --- requests -----------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        out = []
        for v in visuals or []:
            if isinstance(v, str):
                raise LeanVLMError(f"task {task}: video inputs are not supported by the leanvlm plugin yet")
            out.append(v.convert("RGB"))
        return out

    def _inputs(self, contexts: list[str], visuals: list[list]):
        return chat_inputs(self.processor, contexts, visuals, self._device)

    def _record(self, task, doc_id, sample: int, inputs, prefill_ms, decode_ms, new_tokens) -> None:
        trace = self.handle.trace
        try:
            sequences = (
                self.handle.adapter.vision_sequences(inputs, sample)
                if not self.shape.visual_tokens_per_image
                else None
            )
        except LeanVLMError:
            sequences = None
        report = flops_mod.from_trace(
            self.shape,
            trace,
            sample,
            dtype_bytes=next(self.model.parameters()).element_size(),
            vision_sequences=sequences,
        )
        visual = trace.visual_per_layer[sample]
        self.samples.append(
            {
                "task": task,
                "doc_id": doc_id,
                "visual_tokens_in": visual[0],
                "visual_tokens_kept": visual[-1],
                "equivalent_tokens": round(report.equivalent_tokens, 2),
                "prefill_flops": report.prefill_total,
                "prefill_ms": round(prefill_ms, 3),
                "decode_ms": round(decode_ms, 3),
                "new_tokens": new_tokens,
            }
        )

    def write_stats(self) -> None:
        def mean(key):
            values = [s[key] for s in self.samples if s[key] is not None]
            return statistics.fmean(values) if values else None

        doc = {
            "model": self.label,
            "samples": len(self.samples),
            "mean": {
                k: mean(k)
                for k in (
                    "visual_tokens_in",
                    "visual_tokens_kept",
                    "equivalent_tokens",
                    "prefill_flops",
                    "prefill_ms",
                    "decode_ms",
                    "new_tokens",
                )
            },
            "notes": "prefill_flops: real FLOPs (2 per multiply-add) of the prompt from leanvlm's trace; "
            "times are per batch divided by its size when batch_size > 1",
            "per_sample": self.samples,
        }
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        self.stats_path.write_text(json.dumps(doc, indent=2) + "\n")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # a batch shares its generation settings
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        batches = [
            g[k : k + self.batch_size] for g in groups.values() for k in range(0, len(g), self.batch_size)
        ]
        bar = tqdm(total=len(requests), desc="leanvlm generate")
        for chunk in batches:
            contexts, visuals = [], []
            for i in chunk:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                contexts.append(context)
                visuals.append(self._visuals(doc_to_visual, task, split, doc_id))
            gen_kwargs = dict(requests[chunk[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            inputs = self._inputs(contexts, visuals)
            max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            sampling = (
                dict(do_sample=True, temperature=temperature, top_p=gen_kwargs.get("top_p"))
                if temperature > 0
                else dict(do_sample=False)
            )
            with PrefillTimer(self.model, self._device) as timer, torch.inference_mode():
                start = time.perf_counter()
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
                total_ms = (time.perf_counter() - start) * 1e3
            new = out[:, inputs["input_ids"].shape[1] :]
            n = len(chunk)
            for row, i in enumerate(chunk):
                text = self.tokenizer.decode(new[row], skip_special_tokens=True)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                results[i] = text
                _, _, _, doc_id, task, _ = requests[i].args
                new_tokens = int((new[row] != self.tokenizer.pad_token_id).sum())
                self._record(
                    task,
                    doc_id,
                    row * int(gen_kwargs.get("num_beams", 1) or 1),  # the prefill ran every beam
                    inputs,
                    timer.prefill_ms / n,
                    (total_ms - timer.prefill_ms) / n,
                    new_tokens,
                )
                self.cache_hook.add_partial(
                    "generate_until", (requests[i].args[0], requests[i].args[1]), text
                )
            bar.update(n)
        bar.close()
        self.write_stats()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="leanvlm loglikelihood"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = chat_inputs(self.processor, context, visuals, self._device)
            # rank with the prompt's last token, not the candidate answer's
            with self.handle.prompt_length(prompt["input_ids"].shape[1]):
                logprob, greedy, n_tokens = continuation_logprob(
                    self.model, self.processor, prompt, continuation, visuals, self._device
                )
            # lmms-eval scores multiple choice with argmin: its HF backends return the continuation's mean
            # per-token loss, and so does this one (comparable scores). Its 0.7.3 response normaliser turns a
            # plain (value, is_greedy) tuple into a string; a GenerationResult passes it through intact.
            mean_loss = -logprob / n_tokens
            out.append(GenerationResult(text=(mean_loss, greedy)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "multi-round generation is not supported by the leanvlm lmms-eval plugin yet"
        )


def continuation_logprob(
    model, processor, prompt_inputs, continuation: str, visuals, device
) -> tuple[float, bool, int]:
    """Sum of log-probabilities of ``continuation``'s tokens after the prompt, whether greedy decoding
    would produce exactly them, and their number. Continuation tokens are text, never dropped, so they
    are the last slots of the (possibly reduced) sequence."""
    tokenizer = getattr(processor, "tokenizer", processor)
    cont_ids = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    if cont_ids.shape[1] == 0:
        raise LeanVLMError(f"continuation {continuation!r} has no tokens")
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], cont_ids], -1)
    inputs["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], torch.ones_like(cont_ids)], -1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(cont_ids)], -1)
    with torch.inference_mode():
        logits = model(**inputs).logits[0].float()
    n = cont_ids.shape[1]
    predicted = logits[-n - 1 : -1]  # the position before each continuation token predicts it
    logprobs = torch.log_softmax(predicted, -1).gather(-1, cont_ids[0][:, None])[:, 0]
    return float(logprobs.sum()), bool((predicted.argmax(-1) == cont_ids[0]).all()), n
