"""The one exception type for bad user input.

Raised with one sentence that names the file, line or field and says what to
do; the CLI prints it without a traceback. Library callers can catch it.
"""


class ProxyKDError(ValueError):
    """Bad input: a file, a field or a value the user must fix."""
