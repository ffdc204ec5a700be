"""Every error a user can cause, in one place. Each has a message that says what to do; the
CLI prints it on one line (no traceback) and exits with code 2.

    from tide_local.errors import TideError   # catches all of them
"""


class TideError(Exception):
    """Base class of every user-facing error."""

    exit_code = 2


# -- the installation ---------------------------------------------------------------------------
class GGMLLibraryError(TideError):
    """libggml is missing or not the version our declarations were written for."""


class DeviceError(TideError):
    """The requested device does not exist in the loaded libggml."""


# -- input files --------------------------------------------------------------------------------
class CheckpointError(TideError):
    """A Hugging Face checkpoint directory is unusable (missing file, wrong model, bad tensor)."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is a model we do not run (another architecture, LLaDA2.2 block routing)."""


class GGUFError(TideError):
    """A GGUF file is malformed, truncated, or not a LLaDA2 model."""


class ChatTemplateError(TideError):
    """The model's chat template is missing or fails to render."""


class TraceError(TideError):
    """A routing trace file is unreadable or does not match the model."""


class ProfileError(TideError):
    """A profile file is unreadable, of another format or version, or of another model."""


# -- what was asked -----------------------------------------------------------------------------
class UsageError(TideError):
    """A bad command-line option or combination of options."""


class ContextError(TideError, ValueError):
    """A prompt plus the tokens asked for does not fit the context the engine was loaded with
    (a ValueError too: it is a bad argument of the call)."""


class EngineBusyError(TideError):
    """An engine was asked for a second generation in the thread whose stream is still open."""


class BudgetError(TideError):
    """The device memory budget cannot hold what the placement needs."""


class OutputPathError(TideError):
    """The output file cannot be written."""


# -- tools we drive -----------------------------------------------------------------------------
class LlamaCppError(TideError):
    """llama.cpp (for `tide bench`) cannot be loaded or run on the model."""
