"""The embedded durable backend: a SQLite-backed durabletask sidecar served in-process.

Owns ``<state_dir>/state.db`` and the unix socket the SDK's ``TaskHubGrpcWorker`` and
``TaskHubGrpcClient`` connect to (``store`` = SQLite schema, transactions, leases;
``servicer`` = the TaskHubSidecarService RPCs; ``server`` = lifecycle).
"""

from .server import EmbeddedBackend
from .statedir import StateDirError

__all__ = ["EmbeddedBackend", "StateDirError"]
