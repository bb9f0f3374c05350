"""Real servers for tests."""

from forwarder.localredis import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
