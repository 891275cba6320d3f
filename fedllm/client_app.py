"""Flower's component path of the ClientApp before fedllm.client existed (`clientapp =
"fedllm.client_app:app"` in a project's pyproject.toml): kept for one release; the app is
`fedllm.client.app:app`."""

from fedllm.client.app import app

__all__ = ["app"]
