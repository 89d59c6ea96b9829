"""The one error of starting and supervising tritonserver, shared by the modules that do it."""


class TritonServerError(RuntimeError):
    """The server could not be started, died, or did not become ready."""
