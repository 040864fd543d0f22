"""User commands on top of the registry: ``predict``/``submission``/batch, ``audit``/``rollback``, ``summary``."""
