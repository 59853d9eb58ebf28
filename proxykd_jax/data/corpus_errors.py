"""`DataError` and the wording of a bad corpus row: which field, what is wrong with it, what to do.

Shared by the corpus's readers (`corpus_files.py`, `corpus_logprobs.py`, `corpus.py`) and by `prepare`'s
messages (`prepare_errors.py`: `without_advice` for a list of several bad rows).
"""

from proxykd_jax.errors import ProxyKDError


class DataError(ProxyKDError):
    """Bad input data; the message names the file and the line or sample id."""

    def __init__(self, message: str, reason: str = "bad_row"):
        super().__init__(message)
        self.reason = reason


_FIX = "fix or remove the line, or set data.on_error=skip"


def without_advice(message: str) -> str:
    """A bad row's sentence without the advice each one ends with (for a list of several)."""
    return message.removesuffix(f"; {_FIX}.").rstrip(".") + "."


def _show(value) -> str:
    """A short description of a bad value for a message."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _bad(where: str, field: str, problem: str, reason: str = "bad_logprobs") -> DataError:
    return DataError(f"{where}: field '{field}' {problem}; {_FIX}.", reason)
