"""From a job's events to OpenAI's JSON: whole responses and Server-Sent Events.

:func:`answer` turns a job's blocks into text parts and ends with an :class:`Outcome`; a
*format* (chat or completion) says what JSON a part, the opening and the end are. Whole
responses and streams are both built from the same parts, so a stream concatenated is the
whole answer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tide_local.diffusion import BlockEvent
from tide_local.results import GenerationResult

from .errors import APIError, client_gone, internal, shutting_down
from .scheduler import Dropped, Job, ShuttingDown
from .text import AnswerText


@dataclass
class Outcome:
    """A finished answer: its text (cut at a stop string), OpenAI's finish_reason, the result."""

    text: str
    finish_reason: str  # "stop" or "length"
    result: GenerationResult

    def usage(self) -> dict:
        stats = self.result.stats
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.tokens,
                "total_tokens": stats.prompt_tokens + stats.tokens}

    def tide(self) -> dict:
        """tide's statistics of the decode (the per-pass offload log left out: it grows with every step)."""
        stats = self.result.stats.to_dict()
        if stats.get("offload"):
            stats["offload"].pop("per_step", None)
        return stats


async def answer(job: Job, tokenizer, stops: Sequence[str]) -> AsyncIterator[str | Outcome]:
    """The job's answer as text parts while its blocks finish, then its Outcome. A stop string
    found in the text cancels the rest of the decode. Raises APIError: 503 when the server
    stopped the job, 499 when its client left, 500 when the engine failed."""
    text = AnswerText(tokenizer, stops)
    result = None
    try:
        async for event in job.events():
            if isinstance(event, BlockEvent):
                part = text.block(event.answer)
                if text.stopped:
                    job.cancel("stop")
            else:
                result = event
                part = text.finish(event.text)
            if part:
                yield part
    except ShuttingDown:
        raise shutting_down() from None
    except Dropped:
        raise client_gone() from None
    except APIError:
        raise
    except Exception as err:  # the engine's failure, sent by the worker
        raise internal(err) from err
    reason = "stop" if text.stopped else result.stats.finish_reason
    if reason == "cancelled":  # by the server's stop or the client's leaving: "stop" would pass it as complete
        raise shutting_down() if job.cancel_reason == "shutdown" else client_gone()
    yield Outcome(text.text, reason, result)


async def whole(parts: AsyncIterator[str | Outcome]) -> Outcome:
    """The Outcome at the end of `parts` (their text is in it)."""
    async for item in parts:
        if isinstance(item, Outcome):
            return item
    raise AssertionError("answer() ends with an Outcome")


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def events(fmt, parts: AsyncIterator[str | Outcome]) -> AsyncIterator[str]:
    """The Server-Sent Events of a streamed answer: the opening, a chunk per text part, the
    closing chunks, then `data: [DONE]`. An error after the stream began is an event too."""
    for chunk in fmt.opening():
        yield f"data: {_json(chunk)}\n\n"
    try:
        async for item in parts:
            chunks = fmt.closing(item) if isinstance(item, Outcome) else [fmt.part(item)]
            for chunk in chunks:
                yield f"data: {_json(chunk)}\n\n"
    except APIError as err:
        yield f"data: {_json(err.body())}\n\n"
    yield "data: [DONE]\n\n"


class _Format:
    """What is common to both endpoints' JSON: id, created, model, and the usage chunk."""

    prefix = ""
    chunk_object = ""

    def __init__(self, model: str, include_usage: bool = False):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict | None, **extra) -> dict:
        chunk = {**self._head(self.chunk_object), "choices": [choice] if choice is not None else []}
        if self.include_usage:  # as OpenAI: every chunk has usage (null but in the last)
            chunk["usage"] = None
        return {**chunk, **extra}

    def closing(self, outcome: Outcome) -> list[dict]:
        """The chunk with finish_reason (and tide's statistics), then usage if asked for."""
        chunks = [self._chunk(self._final_choice(outcome.finish_reason), tide=outcome.tide())]
        if self.include_usage:
            chunks.append(self._chunk(None, usage=outcome.usage()))
        return chunks

    def _final_choice(self, finish_reason: str) -> dict:
        raise NotImplementedError


class ChatFormat(_Format):
    """POST /v1/chat/completions."""

    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    @staticmethod
    def _choice(delta: dict, finish_reason: str | None = None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict]:
        return [self._chunk(self._choice({"role": "assistant", "content": ""}))]

    def part(self, text: str) -> dict:
        return self._chunk(self._choice({"content": text}))

    def _final_choice(self, finish_reason: str) -> dict:
        return self._choice({}, finish_reason)

    def response(self, outcome: Outcome) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                             "logprobs": None, "finish_reason": outcome.finish_reason}],
                "usage": outcome.usage(), "tide": outcome.tide()}


class CompletionFormat(_Format):
    """POST /v1/completions; `echo`: the prompt's text, put before the answer."""

    prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(self, model: str, include_usage: bool = False, echo: str = ""):
        super().__init__(model, include_usage)
        self.echo = echo

    @staticmethod
    def _choice(text: str, finish_reason: str | None = None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict]:
        return [self._chunk(self._choice(self.echo))] if self.echo else []

    def part(self, text: str) -> dict:
        return self._chunk(self._choice(text))

    def _final_choice(self, finish_reason: str) -> dict:
        return self._choice("", finish_reason)

    def response(self, outcome: Outcome) -> dict:
        return {**self._head("text_completion"),
                "choices": [self._choice(self.echo + outcome.text, outcome.finish_reason)],
                "usage": outcome.usage(), "tide": outcome.tide()}
