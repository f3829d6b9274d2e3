"""Execution engines and the choice between them (``--engine``).

- ``local`` (:mod:`visionbatch.engines.local`): no Ray; decode worker processes, the
  model and the writer in the driver's process. The default on one machine.
- ``ray`` (:mod:`visionbatch.engines.ray`): Ray Data, for ``--address``, more than one
  GPU, or on request.

Both pass the same contract suite (``tests/test_engine_contract.py``); a third engine
is a module here, a line in ``ENGINES`` and a line in that suite.
"""

from __future__ import annotations

import importlib

from visionbatch.config import ClassifyConfig, ExportConfig
from visionbatch.engines.base import Engine, gpu_count

# name -> "module:class", imported when chosen (Ray is heavy, and absent from some installs)
ENGINES = {"local": "visionbatch.engines.local:LocalEngine", "ray": "visionbatch.engines.ray:RayEngine"}


def make_engine(config: ClassifyConfig | ExportConfig, model: bool = True) -> Engine:
    """``--engine``: auto takes Ray for a cluster (``--address``) or, for a job with a
    ``model``, more than one GPU; else the local engine."""
    name = config.engine
    if name == "auto":
        name = "ray" if config.address or (model and gpu_count() > 1) else "local"
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
