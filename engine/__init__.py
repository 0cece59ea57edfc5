"""drjobs engine: the machinery every job shares."""

__version__ = "0.2.0"
