"""Thin HTTP routes: parse nothing, decide nothing; the gateway does the work."""

from router.api.errors import install_error_handlers
from router.api.gatewayapi import GatewayAPI
from router.api.routes import build_routes

__all__ = ["GatewayAPI", "build_routes", "install_error_handlers"]
