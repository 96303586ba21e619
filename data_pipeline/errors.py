"""The one exception the data pipeline raises for bad input.

Every message names the file (or key, or value) and what was expected, so a user can fix the
problem without reading a traceback. Command lines print it and exit with status 2.
"""


class DataError(ValueError):
    """Bad data input: a missing or corrupt file, a mismatched tokenizer, a changed manifest."""
