"""Summary: what a job did, added up from per-shard counts (never from a pass over DEST).

The writer counts each shard as it writes it (:func:`shard_counts`); the manifest keeps
those counts; the driver adds them into a :class:`Summary`, printed at the end and
written to DEST/_summary.json. A resumed job adds the counts of the shards an earlier
run committed, so its summary covers the whole job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from visionbatch.counts import metric_counts
from visionbatch.labels import folder_of
from visionbatch.results import STAGE_COLUMNS, error_kind

_UNMAPPED_EXAMPLES = 20


def shard_counts(table: pa.Table, labelled: bool = True) -> dict:
    """Counts of one shard's result rows (with the pipeline's stage-time columns), taken
    from its metric counts so that the summary and the metrics count each row alike (a
    row with an error is an error, never unlabelled); ``labelled``: the job asked for
    true labels, so rows without one are worth naming."""
    metrics = metric_counts(table)
    errors = table.column("error")
    model_errors = [error for error in pc.drop_null(errors).to_pylist() if error_kind(error) == "model_error"]
    unlabelled = pc.and_(pc.is_null(errors), pc.is_null(table.column("true_label")))
    unmapped_paths = table.filter(unlabelled).column("path").to_pylist() if labelled else []
    return {
        "predicted": metrics["rows"] - metrics["errors"],
        "failed": metrics["errors"],
        "errors_by_kind": metrics["errors_by_kind"],
        "labelled": metrics["labelled"],
        "top1_correct": metrics["top1_hits"],
        "top5_correct": metrics["top5_hits"],
        "no_true_label": pc.sum(unlabelled).as_py() or 0,
        "unmapped_folders": sorted({folder_of(path) for path in unmapped_paths})[:_UNMAPPED_EXAMPLES],
        "model_error": model_errors[0] if model_errors else None,
        "metrics": metrics,  # the manifest adds these up for evaluate (not kept per shard)
        "stage_seconds": {stage: pc.sum(table.column(column)).as_py() or 0.0
                          for column, stage in STAGE_COLUMNS.items() if column in table.column_names},
    }


@dataclass
class Summary:
    """What a job did, printed at the end and written to DEST/_summary.json."""

    model: str
    device: str
    dtype: str
    dest: str | None = None
    labels: str = "dirs"
    images_found: int = 0
    already_done: int = 0
    predicted: int = 0
    failed: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    skipped_non_image: int = 0
    skipped_special: int = 0
    special_files: list[str] = field(default_factory=list)  # the first few of them (sources.SPECIAL_EXAMPLES)
    skipped_folder_links: int = 0
    unlabelled: int = 0
    unmapped_folders: list[str] = field(default_factory=list)
    labelled: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    shards: int = 0
    wall_time_s: float = 0.0
    time_to_first_result_s: float | None = None
    images_per_s: float = 0.0
    steady_images_per_s: float | None = None  # after the first result: excludes start-up
    certified_images_per_s: float | None = None  # after the certificate decided: the chosen path's pace
    batch_size: int = 0
    replicas: int = 0
    # Where the time went: wall seconds in the driver, summed worker seconds per stage.
    stage_times: dict[str, float] = field(default_factory=dict)
    # What ran the model (its path, e.g. openvino/f32) and the certificate that chose it.
    runtime: dict | None = None

    @property
    def top1(self) -> float | None:
        return self.top1_correct / self.labelled if self.labelled else None

    @property
    def top5(self) -> float | None:
        return self.top5_correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict:
        return {**asdict(self), "top1": self.top1, "top5": self.top5}

    def add_shard(self, rows: int, counts: dict) -> None:
        """Count one committed shard."""
        self.shards += 1
        self.images_found += rows
        self.predicted += counts["predicted"]
        self.failed += counts["failed"]
        for kind, n in counts["errors_by_kind"].items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        self.labelled += counts["labelled"]
        self.top1_correct += counts["top1_correct"]
        self.top5_correct += counts["top5_correct"]
        if self.labels != "none":
            self.unlabelled += counts["no_true_label"]
            for folder in counts["unmapped_folders"]:
                if folder not in self.unmapped_folders and len(self.unmapped_folders) < _UNMAPPED_EXAMPLES:
                    self.unmapped_folders.append(folder)
        for stage, seconds in counts["stage_seconds"].items():
            self.stage_times[stage] = self.stage_times.get(stage, 0.0) + seconds

    def format(self) -> str:
        lines = [
            f"images found      {self.images_found}" + (f" ({self.already_done} already done)" if self.already_done else ""),
            f"predicted         {self.predicted}",
            f"failed            {self.failed}"
            + ("  (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items())) + ")" if self.failed else ""),
            f"non-image skipped {self.skipped_non_image}",
            f"wall time         {self.wall_time_s:.1f} s   ({self.images_per_s:.1f} images/s)",
        ]
        if self.skipped_special:
            named = ", ".join(self.special_files[:5]) + (", ..." if self.skipped_special > 5 else "")
            lines.append(f"special skipped   {self.skipped_special} FIFOs, sockets, devices or broken links: {named}")
        if self.skipped_folder_links:
            lines.append(f"links skipped     {self.skipped_folder_links} folder symlinks not followed "
                         "(see --follow-symlinks)")
        if self.labelled:
            lines.append(f"top-1 accuracy    {self.top1:.2%}   top-5 {self.top5:.2%}   ({self.labelled} labelled)")
        if self.unlabelled:
            example = ", ".join(sorted(self.unmapped_folders)[:5])
            lines.append(f"unlabelled        {self.unlabelled} (folders with no matching class: {example}"
                         + (", ..." if len(self.unmapped_folders) > 5 else "") + ")")
        if self.runtime:
            lines.append(f"model path        {runtime_line(self.runtime)}")
        if self.dest:
            lines.append(f"results           {self.dest}")
        return "\n".join(lines)


def runtime_line(runtime: dict) -> str:
    """What ran the model, and the certificate's figures, in one line."""
    certificate = runtime.get("certificate")
    if not certificate:
        return runtime["path"] + "".join(f"; {note}" for note in runtime.get("notes", [])[-1:])
    trials = "; ".join(
        f"{trial['path']} {trial['verdict']}"
        + (f" on {trial['images']} images ({trial['agreed']} agree, bound {trial['agreement_lower_bound']:.2%}, "
           f"largest score difference {trial['max_score_difference']:.2g})" if trial["images"] else "")
        + (f": {trial['reason']}" if trial["reason"] else "")
        for trial in certificate["trials"])
    undecided = "" if certificate["decided"] else " (undecided when the job ended: the reference ran it)"
    return f"{certificate['chosen']}{undecided}; certificate against {certificate['reference']}: {trials}"
