"""HTTP API and web page for a trained model: ``python -m latentdiff.serve --model runs/ldm``.

Needs the optional ``serve`` extra (Starlette + uvicorn): ``pip install -e '.[serve]'``. This module
imports neither, so a missing extra is reported as one clear line instead of an ImportError trace.
"""

from __future__ import annotations

from ..errors import LatentDiffError

class MissingExtraError(LatentDiffError, ImportError):
    """The packages of the ``serve`` extra are not installed."""


def require_serve_extra() -> None:
    """Raise MissingExtraError naming the install command unless Starlette and uvicorn import."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"the server needs the {e.name} package: install the serve extra with "
                                "pip install -e '.[serve]'") from None
