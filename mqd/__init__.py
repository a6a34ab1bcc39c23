"""mqd: a durable, distributed message queue in Python asyncio."""

__version__ = "0.1.0"
