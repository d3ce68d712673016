"""KD methods beyond 'ce' and 'kd': each module registers its `distill.Method` entries on import."""

from kdjax.methods import simkd  # noqa: F401
from kdjax.methods import subclass  # noqa: F401
from kdjax.methods import feature, relation, crd, dkd  # noqa: F401
from kdjax.methods import repdistiller_zoo  # noqa: F401
