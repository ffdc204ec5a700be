"""The request bodies of /v1/chat/completions and /v1/completions, as typed pydantic models.

Known fields are typed strictly (a string is not a number, true is not 1), so a wrong type is a
400 naming the field; unknown fields are allowed and ignored, as OpenAI clients send fields of
their own. Value ranges are not repeated here: the decoding options' one table
(tide_local.diffusion.options) checks them when the job is made (jobs.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI

Number = StrictFloat | StrictInt  # JSON's 1 and 1.0 alike


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Body):
    """A part of a message's content; only text parts exist for a text model."""

    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None  # None: an assistant turn that said nothing

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: StrictBool = False


class Sampling(_Body):
    """The fields both endpoints share: the model, how to decode, how to answer."""

    model: StrictStr | None = None  # None: the one model served
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    # tide's own decoding options
    threshold: Number | None = None
    steps: StrictInt | None = None
    block_length: StrictInt | None = None
    top_k: StrictInt | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in strings):
            raise ValueError("a stop string must not be empty")
        return stop

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def length_field(self) -> str:
        """The field that sets the answer's length."""
        return "max_tokens"

    def decoding(self) -> dict[str, object]:
        """The decoding options (DecodeOptions' names) this request sets; None: not set."""
        return {"max_new_tokens": getattr(self, self.length_field()), "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "threshold": self.threshold,
                "steps": self.steps, "block_length": self.block_length}

    def field_of(self, option: str) -> str:
        """The request field that sets a decoding option (for an error's `param`)."""
        return self.length_field() if option == "max_new_tokens" else option


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name of max_tokens

    def length_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def turns(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictInt]  # text, or token ids
    echo: StrictBool = False


def field_names() -> set[str]:
    """Every field name of the bodies above (errors.py keeps these in an error's `param`)."""
    models = (TextPart, Message, StreamOptions, ChatRequest, CompletionRequest)
    return {name for model in models for name in model.model_fields}
