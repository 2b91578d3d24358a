"""Where pensieve keeps its state on a user's machine: one folder per kind of state.

``state_dir()`` is ``$PENSIEVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pensieve``, else
``~/.cache/pensieve``; under it, ``models/`` (the demo model and other built models) and
``prompt-cache/`` (the prompt cache's disk tier). The server resolves this folder itself and
hands it over with :func:`configure` when it starts the bridge, so that the server and the
bridge can never disagree; the default here serves the bridge used on its own
(``python -m pensieve_bridge.demo``, the tests).
"""

from __future__ import annotations

import os
from pathlib import Path

_configured: Path | None = None


def configure(state: str | os.PathLike) -> None:
    """Uses ``state`` as the state folder from now on (the server's resolved path)."""
    global _configured
    _configured = Path(state)


def state_dir() -> Path:
    """The folder all of pensieve's state lives under."""
    if _configured is not None:
        return _configured
    if os.environ.get("PENSIEVE_CACHE_DIR"):
        return Path(os.environ["PENSIEVE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "pensieve"
    return Path.home() / ".cache" / "pensieve"


def models_dir() -> Path:
    """Built models (the demo model): ``<state>/models``."""
    return state_dir() / "models"


def prompt_cache_dir() -> Path:
    """The prompt cache's disk tier: ``<state>/prompt-cache``."""
    return state_dir() / "prompt-cache"
