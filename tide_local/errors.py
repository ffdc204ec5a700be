"""Errors a user can cause. Each has a message that says what to do; the CLI prints it
on one line (no traceback) and exits with code 2."""


class TideError(Exception):
    """Base class of every user-facing error."""

    exit_code = 2


class GGMLLibraryError(TideError):
    """libggml is missing or not the version our declarations were written for."""


class CheckpointError(TideError):
    """A Hugging Face checkpoint directory is unusable (missing file, wrong model, bad tensor)."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is a model we do not run (another architecture, LLaDA2.2 block routing)."""


class GGUFError(TideError):
    """A GGUF file is malformed, truncated, or not a LLaDA2 model."""


class OutputPathError(TideError):
    """The output file cannot be written."""
