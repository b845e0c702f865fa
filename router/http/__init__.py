"""Thin HTTP routes: parse nothing, decide nothing; the gateway does the work."""

from router.http.errors import install_error_handlers
from router.http.fastlane import GatewayAPI
from router.http.routes import build_routes

__all__ = ["GatewayAPI", "build_routes", "install_error_handlers"]
