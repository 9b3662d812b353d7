"""Adapters that route concrete stacks' calls through an :class:`emitguard.Guard`.

Each module is a pluggy plugin found through the ``emitguard`` entry-point group:

- :mod:`emitguard_adapters.manager`: legacy connection managers (``send_to_thread`` and
  ``update_connection_thread`` under any names, sync or async; instance, class or dotted path).
"""
