"""In-process stand-ins for the services spillover talks to, for tests."""

from tests.fakes.plateforme import DEFAULT_API_KEY, DEFAULT_MODELS, FakePlateforme, create_app
from tests.fakes.server import ServerThread, free_port

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODELS",
    "FakePlateforme",
    "ServerThread",
    "create_app",
    "free_port",
]
