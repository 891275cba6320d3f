"""Flower's component path of the ServerApp before fedllm.server existed (`serverapp =
"fedllm.server_app:app"` in a project's pyproject.toml): kept for one release; the app is
`fedllm.server.app:app`."""

from fedllm.server.app import app

__all__ = ["app"]
