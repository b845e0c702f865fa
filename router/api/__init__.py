"""Thin HTTP routes: parse nothing, decide nothing; the gateway does the work."""

from router.api.errors import install_error_handlers
from router.api.fastlane import FastLane
from router.api.routes import build_routes

__all__ = ["FastLane", "build_routes", "install_error_handlers"]
