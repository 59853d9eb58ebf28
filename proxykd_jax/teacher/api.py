"""Request bodies `serve` accepts, as pydantic models: a bad field is a 400 that names it.

Ranges follow the OpenAI API: temperature in [0, 2], top_p in (0, 1], n in 1-128, at most 20
top log-probs, at most 4 stop strings; numbers must be finite (JSON `NaN` and `Infinity` are
refused), messages and prompts must not be empty. `stream: true` is refused (400 naming `stream`):
this server answers with whole JSON bodies only.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Choices = Annotated[int, Field(ge=1, le=128)]
MaxTokens = Annotated[int, Field(ge=1)]
TopK = Annotated[int, Field(ge=0, le=20)]


def _stop(value: Any) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of at most 4 strings")


class Message(BaseModel):
    """One chat message; `content` is a string or a list of text parts (joined)."""

    model_config = ConfigDict(extra="ignore")
    role: Annotated[str, Field(min_length=1)]
    content: Any

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            return "".join(p["text"] for p in value)
        raise ValueError("must be a string or a list of {'type': 'text', 'text': ...} parts")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    n: Choices = 1
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: Any = None
    seed: int | None = None  # same seed, same completion, whatever shares the batch
    stream: bool | None = None  # only false: answers are whole JSON bodies, never server-sent events

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("streaming is not supported by this server; send stream=false or leave it out")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str] | None:
        return _stop(value)

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopK | None = None


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: MaxTokens | None = 16
    logprobs: TopK | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")
        return prompts
