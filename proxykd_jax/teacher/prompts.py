"""The prompts file of `collect` and the content key of each (prompt, sample) request."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from proxykd_jax.errors import ProxyKDError


class CollectError(ProxyKDError):
    """A user-facing failure of `collect`: bad input, an endpoint that cannot be used, or a run that
    ended with samples failed or left to do. `stats` holds the run's summary when there was a run."""

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt line: exactly one of `prompt` (text) and `messages` (chat) is set."""

    id: str
    line: int
    prompt: str | None
    messages: tuple | None


def canonical(obj) -> str:
    """One JSON spelling of `obj` (sorted keys, no spaces): what content keys hash."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _lines(p: pathlib.Path):
    """(line number, text) of each line; a line that is not UTF-8 is an error naming its byte."""
    try:
        data = p.read_bytes()
    except OSError as err:
        raise CollectError(
            f"prompts file {str(p)!r} cannot be read ({err.strerror}); check the path and its permissions"
        ) from None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise CollectError(
                f"{p.name} line {lineno}: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8 "
                "text; save the file as UTF-8 or remove the line"
            ) from None


def _check_text(where: str, fields: dict) -> None:
    """Refuses a string that is not text: a lone surrogate (`"\\ud83d"` without its pair, as a truncated emoji
    in scraped data spells it) parses as JSON but cannot be encoded, hashed into a key or sent."""
    for name, value in fields.items():
        try:
            canonical(value).encode("utf-8")
        except UnicodeEncodeError as err:
            raise CollectError(
                f"{where}: '{name}' holds {err.object[err.start : err.end]!r}, half of a UTF-16 surrogate pair "
                "that is not text; fix or remove the line"
            ) from None


def read_prompts(path: str, api: str) -> list[Prompt]:
    """Reads and validates the whole prompts file before any request is made."""
    p = pathlib.Path(path)
    if not path or not p.is_file():
        raise CollectError(f"prompts file {path!r} does not exist; set collect.prompts to a JSONL file")
    prompts, seen = [], {}
    for lineno, raw in _lines(p):
        if not raw.strip():
            continue
        where = f"{p.name} line {lineno}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CollectError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise CollectError(
                f"{where}: expected an object with exactly one of 'prompt' (string) "
                "or 'messages' (list of {role, content}); fix or remove the line"
            )
        text, messages = obj.get("prompt"), obj.get("messages")
        if "prompt" in obj and (not isinstance(text, str) or not text):
            raise CollectError(f"{where}: 'prompt' must be a non-empty string; fix or remove the line")
        if "messages" in obj:
            ok = (
                isinstance(messages, list)
                and messages
                and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages
                )
            )
            if not ok:
                raise CollectError(
                    f"{where}: 'messages' must be a non-empty list of objects with "
                    "string 'role' and 'content'; fix or remove the line"
                )
            if api != "chat":
                raise CollectError(
                    f"{where}: chat 'messages' need collect.api='chat' "
                    f"(it is {api!r}); use 'prompt' text or switch the api"
                )
            messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        _check_text(where, {"id": obj.get("id"), "prompt": text, "messages": messages})
        pid = obj.get("id")
        if pid is None:
            pid = hashlib.sha256(canonical(text if messages is None else list(messages)).encode()).hexdigest()[:16]
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise CollectError(f"{where}: 'id' must be a string or integer; fix the line")
        pid = str(pid)
        if pid in seen:
            raise CollectError(f"{where}: id {pid!r} already used on line {seen[pid]}; prompt ids must be unique")
        seen[pid] = lineno
        prompts.append(Prompt(pid, lineno, text, messages))
    if not prompts:
        raise CollectError(f"prompts file {path!r} holds no prompts")
    return prompts


def sampling_params(cfg) -> dict:
    """The sampling parameters that go into every request and every content key: temperature and top_p are None
    where they are not sent (the endpoint samples at its own settings), and a limit sent under another name than
    max_tokens is named (both are absent from the keys of the default settings, which stay what they were)."""
    sent = bool(cfg.get("send_sampling", True))
    params = {
        "api": cfg.api,
        "temperature": float(cfg.temperature) if sent else None,
        "top_p": float(cfg.top_p) if sent else None,
        "max_tokens": int(cfg.max_tokens),
        "stop": list(cfg.stop),
        "top_logprobs": int(cfg.top_logprobs),
    }
    if cfg.get("token_limit", "max_tokens") != "max_tokens":
        params["token_limit"] = cfg.token_limit
    return params


def request_key(model: str, prompt: Prompt, params: dict, sample_index: int) -> str:
    """Content hash of (endpoint model, prompt, sampling parameters, sample index)."""
    content = prompt.prompt if prompt.messages is None else list(prompt.messages)
    return hashlib.sha256(canonical([model, content, params, sample_index]).encode()).hexdigest()
