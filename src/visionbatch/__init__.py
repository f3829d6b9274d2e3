"""visionbatch: batch image classification at any scale on Ray Data and Hugging Face models."""

from visionbatch.api import classify, iter_results, read_results, run
from visionbatch.config import ClassifyConfig, OutputConfig
from visionbatch.predictor import Predictor
from visionbatch.summary import Summary
from visionbatch.version import __version__

__all__ = ["ClassifyConfig", "OutputConfig", "Predictor", "Summary", "__version__", "classify", "iter_results",
           "read_results", "run"]
