"""Imports every architecture module so that their `register` calls run."""

from kdjax.models import simple  # noqa: F401
from kdjax.models import cifar_resnet  # noqa: F401
from kdjax.models import resnet_large  # noqa: F401
from kdjax.models import vgg  # noqa: F401
from kdjax.models import wrn  # noqa: F401
from kdjax.models import mobilenetv2  # noqa: F401
from kdjax.models import shufflenet  # noqa: F401
from kdjax.models import alexnet  # noqa: F401
from kdjax.models import imagenet  # noqa: F401
from kdjax.models import vit  # noqa: F401
from kdjax.models import bit  # noqa: F401
