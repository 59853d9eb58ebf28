"""What a failed `collect` request was: `classify` maps the official client's exceptions to a `Failure`, which says
whether to retry it (429, 5xx, timeouts, dropped connections, malformed 200 bodies; honouring Retry-After), to
record it for its sample alone, to stop the whole run (a rejected key, no quota, a request field the endpoint
refuses, with the setting to change), or to decline the sample for good (a content filter). Its sentence carries
the server's own message with the API key masked."""

from __future__ import annotations

import email.utils
import re
import time

import openai

from proxykd_jax.teacher.responses import MalformedResponse

__all__ = ["FATAL_STATUS", "RETRYABLE_STATUS", "SETTING_OF_FIELD", "Failure", "classify", "server_message"]

RETRYABLE_STATUS = (408, 409, 429)
FATAL_STATUS = {
    401: "the API key was rejected",
    403: "access is forbidden",
    404: "the endpoint or model was not found",
}
SERVER_MESSAGE_CHARS = 200  # an error body's message is cut to this many characters in sentences
_SAMPLING = "collect.send_sampling=False (temperature and top_p left out)"
# The request fields `collect` sends, and the setting to change where the endpoint calls one unsupported (400
# "Unsupported parameter: 'max_tokens' ..." / "Unsupported value: 'temperature' ...", as reasoning models answer).
SETTING_OF_FIELD = {
    "max_tokens": "collect.token_limit='max_completion_tokens'",
    "max_completion_tokens": "collect.token_limit='max_tokens'",
    "temperature": f"{_SAMPLING}, or collect.temperature to a value it takes",
    "top_p": f"{_SAMPLING}, or collect.top_p to a value it takes",
    "logprobs": "collect.top_logprobs=0 (text only: it gives no log-probs)",
    "top_logprobs": "collect.top_logprobs=0 (text only: it gives no log-probs)",
    "stop": "collect.stop=() (no stop strings)",
    "seed": "collect.send_seed=False",
}
_UNSUPPORTED = re.compile(r"unsupported (?:parameter|value)\W*'(\w+)'", re.IGNORECASE)


class Failure(Exception):
    """One failed attempt. `answered`: the endpoint sent a response (a status line) to it."""

    def __init__(
        self, reason: str, message: str, retryable: bool, *, answered: bool, retry_after=None, fatal=False, final=False
    ):
        super().__init__(message)
        self.reason, self.retryable, self.answered = reason, retryable, answered
        self.retry_after, self.fatal, self.final = retry_after, fatal, final


def retry_after(response) -> float | None:
    if response is None:
        return None
    headers = response.headers
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):  # neither seconds nor an HTTP date: no hint
            return None
        return max(0.0, parsed.timestamp() - time.time())


def server_message(err, secret: str = "") -> str:
    """The error body's own message (OpenAI layout `error.message`, else the body's text), on one line,
    the key masked, cut to SERVER_MESSAGE_CHARS; "" when there is none."""
    body = getattr(err, "body", None)
    message = body.get("message") if isinstance(body, dict) else body
    if not isinstance(message, str):
        return ""
    message = " ".join(message.split())
    if secret:
        message = message.replace(secret, "***")
    if len(message) > SERVER_MESSAGE_CHARS:
        message = message[: SERVER_MESSAGE_CHARS - 3] + "..."
    return message


def refused_field(err) -> str | None:
    """The request field of SETTING_OF_FIELD an error body calls unsupported (its `param`, else the field its
    message names), or None."""
    named = _UNSUPPORTED.search(server_message(err))
    if not (named or str(getattr(err, "code", "") or "") in ("unsupported_parameter", "unsupported_value")):
        return None
    field = err.param if isinstance(getattr(err, "param", None), str) else named and named.group(1)
    return field if field in SETTING_OF_FIELD else None


def classify(err: Exception, secret: str = "") -> Failure:
    """Maps a client exception to a retryable / per-prompt / fatal failure; the sentence carries the
    server's own error message (`secret`, the API key, masked in it)."""
    if isinstance(err, MalformedResponse):
        return Failure("malformed_response", f"the 200 response is not usable: {err}", True, answered=True)
    if isinstance(err, openai.APITimeoutError):
        return Failure("timeout", "the request timed out", True, answered=False)
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err
        # A body cut short means the server did answer (the status line came) and then dropped.
        answered = "message body" in str(cause)
        reason = "dropped" if answered else "connection"
        return Failure(reason, f"connection failed ({type(cause).__name__}: {cause})", True, answered=answered)
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        code = str(getattr(err, "code", "") or "")
        said = server_message(err, secret)
        said = f": {said}" if said else ""
        if status == 429 and code == "insufficient_quota":
            return Failure(
                "quota", "the account is out of quota (429 insufficient_quota)", False, answered=True, fatal=True
            )
        if status in FATAL_STATUS:
            what = f"{FATAL_STATUS[status]} ({status}{said})"
            return Failure(f"http_{status}", what, False, answered=True, fatal=True)
        field = refused_field(err) if status in (400, 422) else None
        if field:  # every request carries it: the first answer stops the run rather than each sample failing
            what = f"the endpoint refuses the request field '{field}' ({status}{said}); set {SETTING_OF_FIELD[field]}"
            return Failure(f"refused_{field}", what, False, answered=True, fatal=True)
        if status >= 500 or status in RETRYABLE_STATUS:
            return Failure(
                f"http_{status}", f"HTTP {status}{said}", True, answered=True, retry_after=retry_after(err.response)
            )
        if "content_filter" in code or "content_filter" in str(err.message):
            return Failure(
                "content_filter", "the endpoint's content filter refused the prompt", False, answered=True, final=True
            )
        return Failure(f"http_{status}", f"HTTP {status}{said}", False, answered=True)
    raise err
