"""clipguard: find, measure and remove backdoors in CLIP models."""

__version__ = "0.1.0"


class ClipguardError(Exception):
    """An error caused by the user's input; the CLI prints its message as one line."""
