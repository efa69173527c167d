"""Model families the engine runs; see ``registry.py``."""
