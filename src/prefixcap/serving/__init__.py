"""`prefixcap serve`: an HTTP API, a web page and Prometheus metrics over a Captioner."""

from prefixcap.system.extras import require

require("serve", feature="prefixcap.serving")

from prefixcap.serving.app import ServerConfig, create_app  # noqa: E402 - after the check, which says what to install

__all__ = ["ServerConfig", "create_app"]
