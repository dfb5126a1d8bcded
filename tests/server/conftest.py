"""Server test fixtures: a real uvicorn server on loopback, shared by the session."""

from .support import served  # noqa: F401  (session fixture)
