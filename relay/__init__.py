"""relay: a standalone SMTP relay — authenticated submission, durable queue, plugin chain, delivery."""

__version__ = "0.1.0"
