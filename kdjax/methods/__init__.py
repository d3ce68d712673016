"""KD methods beyond 'ce' and 'kd': each module registers its `distill.Method` entries on import."""

from kdjax.methods import simkd  # noqa: F401
