"""allconv: the All Convolutional Net (Springenberg et al., arXiv:1412.6806), reproduced.

``import allconv_cli`` is cheap: torch and timm load on first use of the API below, so that
``allconv --help`` stays fast. The networks register with timm as soon as timm is imported,
before or after this package, so ``timm.create_model("all_cnn_c")`` always works.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from allconv_cli.util import lazy_attributes

__version__ = "0.1.0"

# Public API name -> submodule that defines it; imported on first access.
_API = {
    "AllConvNet": "models",
    "NETWORKS": "models",
    "create_model": "models",
    "describe": "models",
    "list_models": "models",
    "resolve_name": "models",
}

__all__ = ["__version__", *_API]


__getattr__, __dir__ = lazy_attributes(__name__, _API)


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Import ``allconv_cli.models`` (which registers our networks) right after timm loads."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # find timm's own spec with the other finders
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            importlib.import_module(f"{__name__}.models")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module(f"{__name__}.models")
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
