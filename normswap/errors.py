"""Exceptions with messages written for the user: what happened and what to do about it."""


class NormswapError(Exception):
    """Base class: the CLI prints these as a one-line error instead of a traceback."""


class UnsupportedArchitectureError(NormswapError):
    pass


class AlreadyRMSNormError(NormswapError):
    """The model has no LayerNorm to convert; the CLI treats this as success with nothing to do."""


class NotExactError(NormswapError):
    """An exact conversion was asked of a model whose norms cannot be swapped exactly (post-LN)."""


class VerificationError(NormswapError):
    """The converted model does not compute what the conversion claims."""


class CheckpointError(NormswapError):
    """A source checkpoint is missing, corrupt, truncated or holds non-finite weights."""


class OutputExistsError(NormswapError):
    pass


class OutputPathError(NormswapError):
    """The output path cannot be used: it overlaps the source, or cannot be created."""


class DiskFullError(NormswapError):
    """A write ran out of disk space, quota or file-size limit; nothing was saved."""


class SourceNotFoundError(NormswapError):
    """A model argument names a local folder that does not exist, or a Hub id that cannot be reached."""


def and_more(total: int, shown: int) -> str:
    """`` (and N more)`` after the first ``shown`` of ``total`` names in a one-line message, else nothing."""
    return f" (and {total - shown} more)" if total > shown else ""
