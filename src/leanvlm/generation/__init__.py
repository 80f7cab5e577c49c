"""The decoding entry through stock ``generate()``: ``custom_generate=lv.generation.generate``.

transformers prepares everything (inputs, cache, logits processors, stopping criteria) and then calls
this entry instead of its own decoding loop. The entry tells the engine which tokens are the prompt and
runs the applied decoding-stage method's loop (``Method.decode``; e.g. self-speculative decoding), or
transformers' own loop when none is applied. With a decoding-stage method applied, a plain
``model.generate(...)`` goes through this entry too.
"""

from __future__ import annotations

from .. import compat


def generate(
    model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **kwargs
):
    """``model.generate(**inputs, custom_generate=leanvlm.generation.generate)``."""
    from ..api import handle_of

    stock = compat.stock_decoding(model, generation_config)
    handle = handle_of(model)
    arguments = dict(
        logits_processor=logits_processor,
        stopping_criteria=stopping_criteria,
        generation_config=generation_config,
        **kwargs,
    )
    if handle is None:
        return stock(input_ids, **arguments)
    engine = handle.engine
    saved = engine.prompt_len
    if input_ids.shape[1]:  # generating from inputs_embeds: input_ids is empty, generate() set the length
        engine.prompt_len = input_ids.shape[1]
    try:
        if engine.decoder is not None:
            return engine.decoder.decode(model, input_ids, stock, **arguments)
        return stock(input_ids, **arguments)
    finally:
        engine.prompt_len = saved
