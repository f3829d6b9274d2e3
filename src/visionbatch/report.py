"""HTML report of a job: one self-contained file that opens offline.

Everything is inline: CSS, a little JS (sortable tables), plots as PNG and thumbnails as
JPEG ``data:`` URIs. A Content-Security-Policy forbids the page any network fetch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visionbatch.destination import DUPLICATES, SUMMARY, Destination
from visionbatch.evaluate import compute_metrics, worst_classes_first
from visionbatch.storage import Storage, is_remote
from visionbatch.summary import runtime_line

GALLERY_SIZE = 12
THUMBNAIL_PX = 128
DUPLICATE_GROUPS_SHOWN, GROUP_MEMBERS_SHOWN = 5, 8  # the largest groups of `visionbatch duplicates`, side by side
THUMBNAIL_MAX_BYTES = 64 << 20
HEATMAP_CLASSES = 15
MAX_FAILED_ROWS = 500
log = logging.getLogger("visionbatch")

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#222}
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}table.kv th{font-weight:normal;color:#555}
table.sortable th{cursor:pointer;user-select:none;background:#f4f4f4}
table.sortable th[data-order=asc]::after{content:" \\25B2"}table.sortable th[data-order=desc]::after{content:" \\25BC"}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:140px;font-size:12px}figure img,.placeholder{display:block;max-width:128px;max-height:128px;margin:auto}
.placeholder{width:128px;height:96px;background:#eee;color:#888;display:flex;align-items:center;justify-content:center}
figcaption{word-wrap:break-word}.wrong{color:#b00}.right{color:#070}.muted{color:#777}
img.plot{max-width:100%}code{font-size:12px}
"""

# Sort a table by the clicked header (numbers numerically, using data-v when present);
# on load, record "<tables>,<images decoded>" on <body> for automated checks.
_JS = """
document.querySelectorAll("table.sortable th").forEach(th => th.addEventListener("click", () => {
  const table = th.closest("table"), col = th.cellIndex, asc = th.dataset.order !== "asc";
  table.querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = asc ? "asc" : "desc";
  const key = tr => { const c = tr.cells[col], v = c.dataset.v ?? c.textContent, n = Number(v);
                      return v !== "" && !isNaN(n) ? n : v.toLowerCase(); };
  const rows = [...table.tBodies[0].rows].sort((a, b) => {
    const x = key(a), y = key(b);
    const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return asc ? order : -order; });
  table.tBodies[0].append(...rows);
}));
window.addEventListener("load", () => {
  const decoded = [...document.images].filter(img => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.rendered = document.querySelectorAll("table").length + "," + decoded;
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and spec:
        return f"{value:{spec}}{suffix}"
    return f"{value}{suffix}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _data_table(headers: list[str], rows: list[list], sortable: bool = False, numeric: set[int] = frozenset()) -> str:
    """A table; cells in ``numeric`` columns are right-aligned and sort by their raw value."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    lines = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i in numeric:
                shown = f"{value:.3f}" if isinstance(value, float) else _fmt(value)
                cells.append(f'<td class="n" data-v="{_e(value)}">{_e(shown)}</td>')
            else:
                cells.append(f"<td>{_e(value)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _plot_img(figure, alt: str) -> str:
    return f'<img class="plot" src="{_png(figure)}" alt="{_e(alt)}">'


def _confidence_plot(right: np.ndarray, wrong: np.ndarray, unlabelled: np.ndarray, calibration_bins: list[dict]) -> str:
    # Figure without pyplot: no global backend state, renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labelled = right.size + wrong.size > 0
    figure = Figure(figsize=(11 if labelled else 6, 3.6))
    hist = figure.add_subplot(1, 2 if labelled else 1, 1)
    edges = np.linspace(0, 1, 21)
    if labelled:
        hist.hist([right, wrong], bins=edges, label=[f"right ({right.size})", f"wrong ({wrong.size})"],
                  color=["#2a9d4b", "#d1453b"], stacked=True)
        hist.legend(loc="upper left")
    else:
        hist.hist(unlabelled, bins=edges, color="#4273b8", label="all predictions")
    hist.set(title="Top-1 confidence", xlabel="score", ylabel="images", xlim=(0, 1))
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    if labelled:
        diagram = figure.add_subplot(1, 2, 2)
        filled = [b for b in calibration_bins if b["count"]]
        diagram.bar([(b["lo"] + b["hi"]) / 2 for b in filled], [b["accuracy"] for b in filled],
                    width=1 / len(calibration_bins), edgecolor="#333", color="#8fb3e0", label="accuracy")
        diagram.plot([0, 1], [0, 1], "--", color="#777", label="perfect calibration")
        diagram.set(title="Reliability (15 bins)", xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        diagram.legend(loc="upper left")
    return _plot_img(figure, "confidence histogram")


def _most_confused(confusion: dict, n: int = HEATMAP_CLASSES) -> tuple[list[str], np.ndarray] | None:
    """The n classes in the most off-diagonal cells, and the matrix among them."""
    off_diagonal: dict[str, int] = {}
    for true, pred, count in confusion["entries"]:
        if true != pred:
            off_diagonal[true] = off_diagonal.get(true, 0) + count
            off_diagonal[pred] = off_diagonal.get(pred, 0) + count
    if not off_diagonal:
        return None
    classes = sorted(off_diagonal, key=lambda c: (-off_diagonal[c], c))[:n]
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true, pred, count in confusion["entries"]:
        if true in index and pred in index:
            matrix[index[true], index[pred]] = count
    return classes, matrix


def _heatmap(classes: list[str], matrix: np.ndarray) -> str:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    size = 2.5 + 0.45 * len(classes)
    figure = Figure(figsize=(size + 1.5, size))
    ax = figure.add_subplot()
    diagonal = np.eye(len(classes), dtype=bool)
    # Colour only the confusions; the (usually much larger) diagonal is drawn grey so it
    # neither sets the colour scale nor looks like a mistake.
    confusions = np.ma.masked_where(diagonal, matrix)
    vmax = max(int(confusions.max() or 0), 1)
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#e4e8ee")
    image = ax.imshow(confusions, cmap=cmap, vmin=0, vmax=vmax)
    short = [c if len(c) <= 22 else c[:21] + "…" for c in classes]
    ax.set_xticks(range(len(classes)), short, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), short)
    ax.set(xlabel="predicted", ylabel="true")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if i != j and count > vmax / 2 else "black")
    figure.colorbar(image, ax=ax, shrink=0.8, ticks=MaxNLocator(integer=True), label="confusions (diagonal: correct, grey)")
    return _plot_img(figure, "confusion matrix of the most confused classes")


def _thumbnail(path: str, s3_endpoint: str | None) -> str | None:
    """A JPEG data URI of the image at most 128 px, or None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(Storage(s3_endpoint).read(path, max_bytes=THUMBNAIL_MAX_BYTES))) as image:
            image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at reduced scale
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    except Exception:  # any unreadable file (missing, not an image, too large) -> placeholder
        return None


def _prediction_caption(row: dict) -> str:
    truth = row["true_label"]
    verdict = "right" if truth is not None and truth == row["label"] else "wrong"
    return (f'<span>true: {_e(truth)}</span><br>' if truth is not None else "") + (
        f'<span class="{verdict if truth is not None else ""}">pred: {_e(row["label"])}</span><br>'
        f'<span class="muted">score {row["score"]:.3f}</span>'
    )


def _label_issue_caption(row: dict) -> str:
    return (f'<span class="wrong">given: {_e(row["given_label"])}</span><br>'
            f'<span class="right">suggested: {_e(row["suggested_label"])}</span><br>'
            f'<span class="muted">#{row["rank"]}, p(given) {row["self_confidence"]:.3f}</span>')


def _gallery(rows: list[dict], thumbnails: dict[str, str | None], caption=_prediction_caption) -> str:
    if not rows:
        return '<p class="muted">None.</p>'
    figures = []
    for row in rows:
        uri = thumbnails.get(row["path"])
        picture = (f'<img src="{uri}" alt="{_e(row["path"])}">' if uri
                   else '<div class="placeholder">unreadable</div>')
        figures.append(f'<figure title="{_e(row["path"])}">{picture}<figcaption>{caption(row)}</figcaption></figure>')
    return f'<div class="gallery">{"".join(figures)}</div>'


def _thumbnails(paths, s3_endpoint: str | None) -> dict[str, str | None]:
    paths = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=8) as pool:  # reads may be remote: overlap the latency
        return dict(zip(paths, pool.map(lambda p: _thumbnail(p, s3_endpoint), paths)))


def _galleries(table: pa.Table, s3_endpoint: str | None) -> str:
    ok = table.filter(pc.is_null(table.column("error")))
    labelled = ok.filter(pc.is_valid(ok.column("true_label")))
    right = pc.equal(labelled.column("label"), labelled.column("true_label"))
    if labelled.num_rows:
        sections = [
            ("Most confident mistakes", labelled.filter(pc.invert(right)).sort_by([("score", "descending")])),
            ("Least confident correct predictions", labelled.filter(right).sort_by([("score", "ascending")])),
        ]
    else:  # nothing to be right or wrong about: show what the model was least sure of
        sections = [("Least confident predictions", ok.sort_by([("score", "ascending")]))]
    picked = [(title, rows.slice(0, GALLERY_SIZE).to_pylist()) for title, rows in sections]
    thumbnails = _thumbnails((row["path"] for _, rows in picked for row in rows), s3_endpoint)
    return "".join(f"<section><h2>{_e(title)}</h2>{_gallery(rows, thumbnails)}</section>" for title, rows in picked)


def _label_issues_section(issues: list[dict], total: int, name: str, s3_endpoint: str | None) -> str:
    """The first rows of DEST's label issues table (``name``): the labels most likely wrong."""
    gallery = _gallery(issues, _thumbnails((row["path"] for row in issues), s3_endpoint), _label_issue_caption)
    return (f"<section><h2>Suspected label errors ({total})</h2><p class=\"muted\">From "
            f"<code>visionbatch label-issues</code>: most likely wrong first; "
            f"all of them in DEST/{name}.</p>{gallery}</section>")


def _duplicate_caption(row: dict) -> str:
    return (('<span class="right">kept</span>' if row["keep"] else
             f'<span>{_e(row["kind"])}, cosine {row["similarity"]:.3f}</span>') +
            (f'<br><span class="muted">given: {_e(row["given_label"])}</span>' if row["given_label"] is not None else ""))


def _duplicates_section(groups: list[list[dict]], total: int, s3_endpoint: str | None) -> str:
    """The largest duplicate groups, each a row of thumbnails, its kept member first."""
    thumbnails = _thumbnails((row["path"] for group in groups for row in group[:GROUP_MEMBERS_SHOWN]), s3_endpoint)
    rows = "".join(f"<h3>{len(group)} images</h3>{_gallery(group[:GROUP_MEMBERS_SHOWN], thumbnails, _duplicate_caption)}"
                   for group in groups)
    return (f"<section><h2>Largest duplicate groups (of {total})</h2><p class=\"muted\">From "
            f"<code>visionbatch duplicates</code>: a deduplicated set keeps the first of each; all of them in "
            f"DEST/{DUPLICATES}.</p>{rows}</section>")


def _run_section(summary: dict | None) -> str:
    if summary is None:
        return f'<section><h2>Run</h2><p class="muted">No {SUMMARY} in DEST.</p></section>'
    errors = ", ".join(f"{k}: {v}" for k, v in sorted((summary.get("errors_by_kind") or {}).items()))
    rows = [
        ("model", summary.get("model")),
        ("device / dtype", f"{summary.get('device')} / {summary.get('dtype')}"),
        ("model path and certificate", runtime_line(summary["runtime"]) if summary.get("runtime") else "-"),
        ("destination", summary.get("dest")),
        ("images found", summary.get("images_found")),
        ("predicted", summary.get("predicted")),
        ("failed", f"{summary.get('failed')}" + (f" ({errors})" if errors else "")),
        ("non-image files skipped", summary.get("skipped_non_image")),
        ("wall time", _fmt(summary.get("wall_time_s"), ".1f", " s")),
        ("time to first result", _fmt(summary.get("time_to_first_result_s"), ".1f", " s")),
        ("throughput", _fmt(summary.get("images_per_s"), ".1f", " images/s")),
        ("batch size / replicas", f"{summary.get('batch_size')} / {summary.get('replicas')}"),
    ]
    parts = ["<section><h2>Run</h2>", _kv_table([(k, _fmt(v)) for k, v in rows])]
    stage_times = summary.get("stage_times")
    if isinstance(stage_times, dict) and stage_times:
        parts.append("<h3>Time per stage</h3>")
        parts.append(_data_table(["stage", "seconds"], [[k, v] for k, v in stage_times.items()], numeric={1}))
    parts.append("</section>")
    return "".join(parts)


def _accuracy_section(metrics: dict, confidence_plot: str) -> str:
    rows = [
        ("top-1 accuracy", _pct(metrics["top1"])),
        ("top-5 accuracy", _pct(metrics["top5"])),
        ("macro precision / recall / F1", " / ".join(_fmt(metrics[k], ".3f") for k in ("macro_precision", "macro_recall", "macro_f1"))),
        ("expected calibration error", _fmt(metrics["ece"], ".3f")),
        ("mean confidence right / wrong", f"{_fmt(metrics['mean_confidence_correct'], '.3f')} / {_fmt(metrics['mean_confidence_wrong'], '.3f')}"),
        ("rows", metrics["rows"]),
        ("labelled / unlabelled / errors", f"{metrics['labelled']} / {metrics['unlabelled']} / {metrics['errors']}"),
    ]
    note = "" if metrics["labelled"] else '<p class="muted">No labelled rows: accuracy needs true labels.</p>'
    return f"<section><h2>Accuracy</h2>{note}{_kv_table(rows)}{confidence_plot}</section>"


def _per_class_section(metrics: dict) -> str:
    rows = [[c["label"], c["precision"], c["recall"], c["f1"], c["support"], c["predicted"]]
            for c in worst_classes_first(metrics["per_class"])]
    table = _data_table(["class", "precision", "recall", "F1", "support", "predicted"], rows,
                        sortable=True, numeric={1, 2, 3, 4, 5})
    return (f'<section><h2>Per class</h2><p class="muted">Worst F1 first; click a header to sort.</p>'
            f"{table}</section>")


def _confusion_section(metrics: dict) -> str:
    confused = _most_confused(metrics["confusion"])
    body = _heatmap(*confused) if confused else '<p class="muted">No confusions between classes.</p>'
    return f"<section><h2>Most confused classes</h2>{body}</section>"


def _failed_section(table: pa.Table) -> str:
    failed = table.filter(pc.is_valid(table.column("error"))).select(["path", "error"])
    if not failed.num_rows:
        return '<section><h2>Failed files</h2><p class="muted">None.</p></section>'
    rows = []
    for row in failed.slice(0, MAX_FAILED_ROWS).to_pylist():
        kind, _, message = row["error"].partition(":")
        rows.append([row["path"], kind, message.strip()])
    more = failed.num_rows - MAX_FAILED_ROWS
    note = f'<p class="muted">... {more} more failed files (see the result files)</p>' if more > 0 else ""
    return (f"<section><h2>Failed files ({failed.num_rows})</h2>"
            f"{_data_table(['path', 'kind', 'error'], rows, sortable=True)}{note}</section>")


def render_report(table: pa.Table, summary: dict | None, s3_endpoint: str | None = None,
                  label_issues: tuple[list[dict], int, str] | None = None,
                  duplicates: tuple[list[list[dict]], int] | None = None) -> str:
    """The report page for result rows and the job's summary (None if absent),
    ``label_issues``: the first rows of DEST's label issues, how many there are and their
    file, and ``duplicates``: DEST's largest duplicate groups and how many there are."""
    metrics = compute_metrics(table)
    ok = table.filter(pc.is_null(table.column("error")))
    scores = pc.fill_null(ok.column("score"), 0.0).to_numpy(zero_copy_only=False)
    truth_valid = pc.is_valid(ok.column("true_label")).to_numpy(zero_copy_only=False)
    right = pc.fill_null(pc.equal(ok.column("label"), ok.column("true_label")), False).to_numpy(zero_copy_only=False)
    confidence_plot = _confidence_plot(scores[truth_valid & right], scores[truth_valid & ~right], scores, metrics["calibration_bins"])
    model = (summary or {}).get("model", "")
    return "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>visionbatch report{' — ' + _e(model) if model else ''}</title><style>{_CSS}</style></head><body>",
        f"<h1>visionbatch report</h1><p class=\"muted\">{_e(model)}</p>",
        _run_section(summary),
        _accuracy_section(metrics, confidence_plot),
        _per_class_section(metrics),
        _confusion_section(metrics),
        _galleries(table, s3_endpoint),
        _label_issues_section(*label_issues, s3_endpoint) if label_issues else "",
        _duplicates_section(*duplicates, s3_endpoint) if duplicates else "",
        _failed_section(table),
        f"<script>{_JS}</script></body></html>",
    ])


def _first_label_issues(destination: Destination) -> tuple[list[dict], int, str] | None:
    """The GALLERY_SIZE first (most likely wrong) rows of DEST's label issues, their count
    (read from the file's head alone) and their file's name; None where label-issues has not run."""
    name = destination.label_issues_file()
    if name is None:
        return None
    import pyarrow.parquet as pq

    with destination.open_file(name) as file:
        issues = pq.ParquetFile(file)
        first = next(issues.iter_batches(batch_size=GALLERY_SIZE), None)
        return (first.to_pylist() if first is not None else []), issues.metadata.num_rows, name


def _largest_duplicate_groups(destination: Destination) -> tuple[list[list[dict]], int] | None:
    """DEST's DUPLICATE_GROUPS_SHOWN largest duplicate groups (rows as the table orders
    them: kept member first) and how many groups there are; None where duplicates has not
    run. Reads the group column whole (8 bytes a row), then the chosen groups' rows."""
    if not destination.exists(DUPLICATES):
        return None
    import pyarrow.parquet as pq

    with destination.open_file(DUPLICATES) as file:
        sizes = pc.value_counts(pq.read_table(file, columns=["group"]).column("group").combine_chunks())
        if not len(sizes):
            return [], 0
        counts, names = sizes.field("counts").to_numpy(), sizes.field("values").to_numpy()
        largest = names[np.lexsort((names, -counts))[:DUPLICATE_GROUPS_SHOWN]]
        rows = pq.read_table(file, filters=[("group", "in", largest.tolist())]).to_pylist()
    by_group: dict[int, list[dict]] = {int(group): [] for group in largest}
    for row in rows:
        by_group[row["group"]].append(row)
    return list(by_group.values()), len(sizes)


def write_report(dest: str, html_path: str, s3_endpoint: str | None = None) -> str:
    """Write the HTML report of DEST's results to html_path (local or s3://); returns html_path."""
    destination = Destination(dest, s3_endpoint)
    table = destination.read_table()
    try:
        summary = json.loads(destination.read_bytes(SUMMARY))
    except (OSError, ValueError):  # a report of the rows alone is still useful
        summary = None
    page = render_report(table, summary, s3_endpoint, _first_label_issues(destination),
                         _largest_duplicate_groups(destination)).encode("utf-8")
    fs, path = Storage(s3_endpoint).resolve(html_path)
    if os.path.dirname(path) == destination.root and not os.path.basename(path).startswith(("_", ".")):
        log.warning("%s sits among DEST's part files: pyarrow.dataset and pandas.read_parquet(DEST) fail on it; "
                    "write the report elsewhere or give it a name starting with '_'", html_path)
    if not is_remote(html_path):
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(page)
    return html_path
