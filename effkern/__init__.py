"""effkern: fast kernels for recent efficiency methods, and each method's flow on top."""

__version__ = "0.1.0"

from effkern import nn, ops  # noqa: E402

__all__ = ["nn", "ops", "__version__"]
