"""The one error type for bad user input: a config field, an input file, a manifest or a checkpoint.

Its message names the field or file and what would be valid; entry points (``train.py``, ``prepare``,
``evaluate.py``) print it as one line instead of a traceback. Anything else that goes wrong is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    """Bad input that the user can fix; the message alone says what and where."""
