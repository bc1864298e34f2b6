"""voxbus shared package: the wire protocol, the Redis bus, configuration and metrics."""

__version__ = "0.1.0"
