"""Built-in chain steps (``relay.plugins.<name>``): each module names its plugin class as ``PLUGIN``.

Every plugin imports nothing from relay but :mod:`relay.plugin` (and the pure :mod:`relay.policies`).
"""
