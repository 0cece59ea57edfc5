"""drjobs engine: the machinery every job shares."""

__version__ = "0.3.0"
