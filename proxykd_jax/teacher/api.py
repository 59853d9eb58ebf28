"""Request bodies `serve` accepts, as pydantic models: a bad field is a 400 that names it.

Ranges follow the OpenAI API: temperature in [0, 2], top_p in (0, 1], n in 1-128, at most 20
top log-probs, at most 4 stop strings; numbers must be finite (JSON `NaN` and `Infinity` are
refused), messages and prompts must not be empty. `stream: true` answers with server-sent events
(stream.py), with log-probs too; `stream_options` null or an object (`include_usage`).

OpenAI fields the server does not implement (`UNSUPPORTED`, `CHAT_UNSUPPORTED`, `COMPLETION_UNSUPPORTED`)
are accepted only at a value that leaves the answer as it is (their default), else refused with a 400
naming them. Any other field, one that cannot change the answer (`user`, `metadata`, `store`,
`parallel_tool_calls`, ...) or one unknown here, is accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Choices = Annotated[int, Field(ge=1, le=128)]
MaxTokens = Annotated[int, Field(ge=1)]
TopK = Annotated[int, Field(ge=0, le=20)]


# field: the values at which ignoring it leaves the answer as the OpenAI API would give it
UNSUPPORTED = {"logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}
CHAT_UNSUPPORTED = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # no tools: none called either way
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}
COMPLETION_UNSUPPORTED = {"suffix": (None, "")}  # and `best_of` other than n, `echo` with `logprobs`


def _default_only(value: Any, info: ValidationInfo, table: dict) -> Any:
    allowed = table[info.field_name]
    if any(value == a and type(value) is not bool for a in allowed) or value is None:
        return value
    shown = " or ".join("null" if a is None else repr(a).replace("'", '"') for a in allowed)
    raise ValueError(f"is not supported by this server; leave it out (or send {shown})")


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
    stream: bool | None = None  # true: the answer as server-sent events, once it is whole (stream.py)
    stream_options: dict | None = None  # read only with stream: {"include_usage": true} adds a usage chunk
    logit_bias: Any = None  # the fields of `UNSUPPORTED`: their defaults only
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _default_only(value, info, UNSUPPORTED)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str] | None:
        return _stop(value)

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopK | None = None
    tools: Any = None  # the fields of `CHAT_UNSUPPORTED`: their defaults only
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @field_validator(*CHAT_UNSUPPORTED, mode="before")
    @classmethod
    def _chat_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _default_only(value, info, CHAT_UNSUPPORTED)


class CompletionRequest(_Sampling):
    prompt: Any  # per prompt its text or its token ids (a backend's `vocab` bounds them: server.py)
    max_tokens: MaxTokens | None = 16
    logprobs: TopK | None = None
    echo: bool = False  # the prompt's text before the answer's (not with `logprobs`: prompts are not scored)
    best_of: Any = None  # null or n: each generated answer is returned
    suffix: Any = None  # the fields of `COMPLETION_UNSUPPORTED`: their defaults only

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        """As the OpenAI API takes it: a string, a list of strings, a list of token ids, or a list of such lists."""
        if isinstance(value, list) and value and all(_is_id(t) for t in value):
            return [value]
        prompts = [value] if isinstance(value, str) else value
        if isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts):
            return prompts
        if (
            isinstance(prompts, list)
            and prompts
            and all(isinstance(p, list) and p and all(map(_is_id, p)) for p in prompts)
        ):
            return prompts
        raise ValueError(
            "must be a non-empty string, a non-empty list of non-empty strings, a non-empty list of token ids "
            "(integers from 0) or a non-empty list of such lists"
        )

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise ValueError(
                "is not supported by this server together with logprobs (it does not score a prompt's tokens); "
                "leave out echo or logprobs"
            )
        return value

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or (type(value) is int and value == info.data.get("n", 1)):
            return value
        raise ValueError(f"is not supported by this server unless it equals n ({info.data.get('n', 1)}); leave it out")

    @field_validator(*COMPLETION_UNSUPPORTED, mode="before")
    @classmethod
    def _completion_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _default_only(value, info, COMPLETION_UNSUPPORTED)


def _is_id(value: Any) -> bool:
    return type(value) is int and value >= 0
