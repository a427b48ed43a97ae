"""Exceptions raised by edpairs (bad arguments raise the built-in ValueError / TypeError)."""


class CudaError(RuntimeError):
    """A CUDA runtime call or kernel launch failed; the message names file, line and CUDA's error."""


class BackendUnavailable(RuntimeError):
    """The requested backend (CUDA) was not compiled into this build of edpairs."""
