"""The litevar version, recorded in the artifacts it writes (kept apart so low layers can read it)."""
__version__ = "0.1.0"
