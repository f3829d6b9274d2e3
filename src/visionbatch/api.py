"""The Python API, above the engines and the commands.

- :func:`run` classifies into a DEST, as ``visionbatch classify`` does (either engine,
  exactly once, resumable); :func:`iter_results` then reads it back a part at a time,
  as Arrow tables (the local engine's way to hand results to Python: what it writes is
  committed, so a reader never sees a half-done shard); :func:`read_results` reads it whole.
- :func:`classify` is Ray's way: a lazy ``ray.data.Dataset`` of result rows, to chain
  into a Ray pipeline (it cannot redo the shards of tasks that died: :func:`run` can).
"""

from __future__ import annotations

import sys
from typing import Iterator

import pyarrow as pa

from visionbatch.config import OutputConfig, config_from_kwargs
from visionbatch.destination import Destination, read_results
from visionbatch.storage import Storage
from visionbatch.summary import Summary

__all__ = ["classify", "iter_results", "read_results", "run"]


def run(sources, output: str, *, format: str = "parquet", overwrite: bool = False, resume: bool = False,
        flush_seconds: float = 30.0, model: str | None = None, progress: bool = True, **options) -> Summary:
    """Classify and write one row per image file to ``output``; returns the :class:`Summary`."""
    from visionbatch.job import run_job

    if model is not None:
        options["model"] = model
    config = config_from_kwargs(sources, **options)
    output_config = OutputConfig(dest=output, format=format, overwrite=overwrite, resume=resume,
                                 flush_seconds=flush_seconds)
    return run_job(config, output_config, progress=sys.stderr if progress else None)


def iter_results(dest: str, columns: tuple[str, ...] | None = None, s3_endpoint: str | None = None
                 ) -> Iterator[pa.Table]:
    """A finished DEST's result rows a part (a shard) at a time, in shard order
    (``columns``: only these): memory bounded by one part at any size of DEST."""
    return Destination(dest, Storage(s3_endpoint)).committed_rows(columns)


def classify(sources, model: str | None = None, **options):
    """Classify every image under ``sources`` on Ray; returns a lazy ``ray.data.Dataset``
    of result rows."""
    from visionbatch.engines.ray import job_dataset
    from visionbatch.job import prepare

    if model is not None:
        options["model"] = model
    prepared, engine = prepare(config_from_kwargs(sources, **options).replace(engine="ray"))
    engine.planner.start()
    return job_dataset(prepared, engine.planner.actor).select_columns(prepared.plan.model.schema.names)
