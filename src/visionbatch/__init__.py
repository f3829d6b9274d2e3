"""visionbatch: batch image classification at any scale on Ray Data and Hugging Face models."""

from visionbatch.config import ClassifyConfig, OutputConfig
from visionbatch.destination import read_results
from visionbatch.engine_ray import classify
from visionbatch.job import run
from visionbatch.predictor import Predictor
from visionbatch.summary import Summary

__all__ = ["ClassifyConfig", "OutputConfig", "Predictor", "Summary", "classify", "run", "read_results"]
__version__ = "0.1.0"
