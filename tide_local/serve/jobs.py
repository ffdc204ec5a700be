"""A request body -> a validated Job: prompt token ids, stop ids and decoding options.

Every check the engine would make at the start of a decode is made here, in the request's
thread, so that a bad request is a 400 before it waits in the queue, and the worker only
decodes. The checks are the engine's own (decode_options, check_context, the tokenizer's
bounds); this module only says which request field each failure is about."""

from __future__ import annotations

import asyncio

from tide_local.diffusion import DecodeOptions, OptionValueError, option_specs
from tide_local.errors import ChatTemplateError, ContextError

from .errors import bad_field, context_exceeded
from .scheduler import Channel, Job
from .schemas import ChatRequest, CompletionRequest, Sampling


def decoding_options(engine, body: Sampling, defaults: dict) -> DecodeOptions:
    """The request's decoding options over the server's (its command line) over the model's."""
    given = {name: value for name, value in body.decoding().items() if value is not None}
    try:
        return engine.decode_options(**{**defaults, **given})
    except OptionValueError as err:  # the server's own were checked at startup: a request's
        param = body.field_of(err.name)
        rule = option_specs()[err.name].rule.removesuffix(" or None")
        raise bad_field(param, f"{param} {rule}, got {given.get(err.name)!r}") from None
    except ValueError as err:  # the one check beyond the table: block_length is the model's
        raise bad_field("block_length", str(err)) from None


def chat_job(engine, body: ChatRequest, defaults: dict, loop: asyncio.AbstractEventLoop) -> Job:
    """The messages through the model's chat template; the answer stops at end of turn."""
    options = decoding_options(engine, body, defaults)
    try:
        ids = engine.chat_prompt(body.turns())
    except ContextError as err:
        raise context_exceeded(str(err), "messages") from None
    except ChatTemplateError as err:
        raise bad_field("messages", f"the model's chat template cannot render these messages: {err}") from None
    except ValueError as err:  # e.g. text that is not valid Unicode
        raise bad_field("messages", str(err)) from None
    return _job(engine, body, "messages", ids, engine.chat_stop_ids(), options, loop)


def completion_job(engine, body: CompletionRequest, defaults: dict, loop: asyncio.AbstractEventLoop) -> Job:
    """The prompt as it is (text or token ids); the answer stops at end of text."""
    options = decoding_options(engine, body, defaults)
    if isinstance(body.prompt, str):
        try:
            ids = engine.tokenizer.encode(body.prompt, max_tokens=engine.n_ctx)
        except ContextError as err:
            raise context_exceeded(str(err), "prompt") from None
        except ValueError as err:
            raise bad_field("prompt", str(err)) from None
    else:
        ids = body.prompt
        vocab = engine.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise bad_field("prompt", f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
    if not ids:
        raise bad_field("prompt", "prompt is empty")
    return _job(engine, body, "prompt", ids, [engine.eos_id], options, loop)


def prompt_text(engine, body: CompletionRequest) -> str:
    """The prompt as text (for echo)."""
    return body.prompt if isinstance(body.prompt, str) else engine.tokenizer.decode(body.prompt)


def _job(engine, body: Sampling, prompt_field: str, ids, stop_ids, options: DecodeOptions, loop) -> Job:
    try:
        engine.check_context(len(ids), options.max_new_tokens)
    except ContextError as err:  # about the prompt when it leaves no room at all, else about the length asked
        raise context_exceeded(str(err), prompt_field if len(ids) >= engine.n_ctx else body.length_field()) from None
    return Job([int(i) for i in ids], list(stop_ids), options, channel=Channel(loop))
