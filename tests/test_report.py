"""HTML report: content checks, then a real headless-Chromium render."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from visionbatch.report import write_report
from conftest import INSTALL_CHROMIUM, installed_chromium, write_finished_dest
from visionbatch.destination import SUMMARY, Destination
from visionbatch.results import RESULT_SCHEMA

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
RIGHT, WRONG = 6, 4  # readable images predicted right / wrong
PLOTS = 2  # confidence histogram + confusion heatmap


def write_dest(root: Path, rows: list[dict], summary: dict | None) -> str:
    destination = Destination(str(root / "dest"))
    write_finished_dest(destination, pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    if summary is not None:
        destination.write_bytes(SUMMARY, json.dumps(summary).encode())
    return destination.uri


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A job's DEST over 10 real JPEGs in class folders, and its report."""
    root = tmp_path_factory.mktemp("report")
    rows = []
    for i in range(RIGHT + WRONG):
        truth = ("cat", "dog")[i % 2]
        path = root / "images" / truth / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.new("RGB", (300, 200), (25 * i, 120, 200 - 15 * i))
        ImageDraw.Draw(picture).ellipse((50, 30, 250, 170), fill=(250, 200, 25 * i))
        picture.save(path)
        label = truth if i < RIGHT else {"cat": "dog", "dog": "<fox>"}[truth]  # "<fox>" must be escaped
        rows.append({"path": str(path), "label": label, "score": 0.3 + 0.06 * i, "top_k_labels": [label, truth],
                     "top_k_scores": [0.3 + 0.06 * i, 0.1], "true_label": truth, "correct": label == truth,
                     "width": 300, "height": 200})
    (root / "images" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    rows.append({"path": str(root / "images/cat/bad.jpg"), "error": "decode: cannot identify <image>", "true_label": "cat"})
    # A confident mistake whose file has since gone: its thumbnail is a placeholder.
    rows.append({"path": str(root / "images/dog/gone.jpg"), "label": "cat", "score": 0.99,
                 "top_k_labels": ["cat"], "true_label": "dog"})
    summary = {"model": "google/vit-base-patch16-224", "device": "cpu", "dtype": "float32", "dest": "x",
               "images_found": 12, "predicted": 11, "failed": 1, "errors_by_kind": {"decode": 1},
               "wall_time_s": 3.25, "images_per_s": 3.4, "batch_size": 8, "replicas": 1,
               "stage_times": {"read": 0.5, "infer": 2.1}}
    dest = write_dest(root, rows, summary)
    html_path = root / "out" / "report.html"
    assert write_report(dest, str(html_path)) == str(html_path)
    return html_path


def test_report_is_self_contained_and_escaped(report):
    page = report.read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/jpeg') == RIGHT + WRONG
    assert page.count('src="data:image/png') == PLOTS
    assert page.count('class="placeholder"') == 1  # gone.jpg
    assert "&lt;fox&gt;" in page and "<fox>" not in page
    assert "cannot identify &lt;image&gt;" in page and "bad.jpg" in page
    for text in ("google/vit-base-patch16-224", "Time per stage", "infer", "Most confident mistakes",
                 "Least confident correct predictions", "Failed files (1)", "Most confused classes"):
        assert text in page


def test_report_without_summary_or_labels(tmp_path):
    rows = [{"path": str(tmp_path / "missing.jpg"), "label": "cat", "score": 0.4, "top_k_labels": ["cat"]}]
    dest = write_dest(tmp_path, rows, summary=None)
    page = Path(write_report(dest, str(tmp_path / "r.html"))).read_text()
    assert f"No {SUMMARY} in DEST" in page
    assert "No labelled rows" in page and "Least confident predictions" in page
    assert "Failed files</h2><p" in page  # "None." rather than a table


@pytest.fixture(scope="session")
def chromium() -> str:
    if shutil.which("chromium") is None and os.geteuid() != 0:
        pytest.skip(f"chromium is not installed; run {INSTALL_CHROMIUM} as root")
    found, output = installed_chromium()  # installed by conftest, in the background, as root
    if not found:
        pytest.skip(f"installing chromium failed: {output[-800:]}")
    return found


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=60)


# Appended to a copy of the report: click the per-class headers as a user would.
SORT_CHECK = """<script>
const perClass = document.querySelector("table.sortable"), headers = perClass.tHead.rows[0].cells;
const column = i => [...perClass.tBodies[0].rows].map(row => row.cells[i].textContent);
headers[0].click(); const byName = column(0);
headers[4].click(); headers[4].click(); const bySupportDescending = column(4);
document.body.dataset.sortCheck = JSON.stringify([byName, bySupportDescending]);
</script></body>"""


def test_report_renders_in_chromium(report, chromium, tmp_path):
    screenshot = tmp_path / "report.png"
    shot = run_chromium(chromium, tmp_path / "profile1", f"--screenshot={screenshot}", "--window-size=1280,2000",
                        report.as_uri())
    assert screenshot.exists(), shot.stderr[-2000:]
    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "screenshot looks blank"

    checked = tmp_path / "report-sort-check.html"
    checked.write_text(report.read_text().replace("</body>", SORT_CHECK))
    dump = run_chromium(chromium, tmp_path / "profile2", "--enable-logging=stderr", "--v=0", "--dump-dom",
                        checked.as_uri())
    # Every console message of the page (script errors, CSP-blocked fetches,
    # console.error) is logged as "...:CONSOLE(line)] ..." on stderr.
    console = [line for line in dump.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, "\n".join(console)

    rendered = re.search(r'data-rendered="(\d+),(\d+)"', dump.stdout)
    assert rendered, "the page's load handler did not run"
    tables, images_loaded = map(int, rendered.groups())
    assert tables >= 3
    assert images_loaded == RIGHT + WRONG + PLOTS

    by_name, by_support = json.loads(html.unescape(re.search(r'data-sort-check="([^"]*)"', dump.stdout).group(1)))
    assert by_name == ["<fox>", "cat", "dog"]
    assert by_support == ["6", "5", "0"]
