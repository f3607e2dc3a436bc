"""`prefixcap serve`: an HTTP API, a web page and Prometheus metrics over a Captioner."""

from prefixcap.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
