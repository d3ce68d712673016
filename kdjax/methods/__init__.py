"""KD methods beyond 'ce' and 'kd': each module registers its `distill.Method` entries on import."""

from kdjax.methods import simkd  # noqa: F401
from kdjax.methods import subclass  # noqa: F401
from kdjax.methods import feature, relation, crd, dkd  # noqa: F401
from kdjax.methods import logit  # noqa: F401
from kdjax.methods import review, ofd, cat  # noqa: F401
from kdjax.methods import mlkd  # noqa: F401
from kdjax.methods import repdistiller_zoo  # noqa: F401
from kdjax.methods import wttm  # noqa: F401
from kdjax.methods import sdd  # noqa: F401
from kdjax.methods import wkd  # noqa: F401
from kdjax.methods import mgd  # noqa: F401
from kdjax.methods import crld  # noqa: F401
from kdjax.methods import deit  # noqa: F401
