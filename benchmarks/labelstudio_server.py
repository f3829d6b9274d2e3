"""A real Label Studio server against a `visionbatch export --format labelstudio` folder.

    python benchmarks/labelstudio_server.py OUT [--label-studio /work/.venv-ls/bin/label-studio]

Starts Label Studio on 127.0.0.1 (a fresh data folder, its one set-up: local files served
from OUT, ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=OUT``, plus a local-files storage for OUT/images
in the project), creates a project with OUT/labeling_config.xml, imports OUT/tasks.json,
checks that every task has its prediction (the config's names and choices fit it) and that
every task's image URL serves the image's bytes, then stops the server. Prints what it saw;
exits 1 on a failed check. Needs Label Studio and requests in the interpreter that runs it
(a venv of their own: pip install label-studio).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

USER, PASSWORD = "check@example.com", "check-password"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a labelstudio export folder")
    parser.add_argument("--label-studio", default=str(Path(sys.executable).parent / "label-studio"))
    args = parser.parse_args()
    out = args.out.resolve()
    tasks = json.loads((out / "tasks.json").read_text())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="ls-check-") as data:
        env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
               "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(out), "LABEL_STUDIO_BASE_DATA_DIR": data,
               # No error reports sent out (nothing is reachable here; and Label Studio 1.23's
               # reporting fails to start with sentry-sdk 3, which pip installs beside it).
               "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
        log = open(os.path.join(data, "server.log"), "w")
        started = time.monotonic()
        server = subprocess.Popen([args.label_studio, "start", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-browser", "--data-dir", data, "--username", USER, "--password", PASSWORD],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    if requests.get(f"{url}/health", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if server.poll() is not None or time.monotonic() - started > 300:
                    print(open(log.name).read()[-3000:])
                    raise SystemExit("Label Studio did not start")
                time.sleep(1)
            print(f"Label Studio up in {time.monotonic() - started:.0f} s at {url}")
            return _check(requests.Session(), url, out, tasks)
        finally:
            server.terminate()
            server.wait(30)


def _check(session: requests.Session, url: str, out: Path, tasks: list[dict]) -> int:
    # Logged in as a browser is (Label Studio 1.23 takes no legacy API token by default).
    session.get(f"{url}/user/login/").raise_for_status()
    session.post(f"{url}/user/login/", data={"email": USER, "password": PASSWORD,
                                             "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                 headers={"Referer": f"{url}/user/login/"}).raise_for_status()
    session.headers.update({"X-CSRFToken": session.cookies["csrftoken"], "Referer": url})
    project = session.post(f"{url}/api/projects", json={
        "title": "visionbatch check", "label_config": (out / "labeling_config.xml").read_text()})
    project.raise_for_status()
    project_id = project.json()["id"]
    storage = session.post(f"{url}/api/storages/localfiles", json={
        "project": project_id, "title": "export images", "path": str(out / "images"), "use_blob_urls": False})
    storage.raise_for_status()
    imported = session.post(f"{url}/api/projects/{project_id}/import", json=tasks)
    imported.raise_for_status()
    print(f"imported          {imported.json().get('task_count')} tasks, "
          f"{imported.json().get('prediction_count')} predictions (of {len(tasks)} tasks in tasks.json)")
    stored = session.get(f"{url}/api/tasks", params={"project": project_id, "page_size": 100000}).json()
    stored = stored["tasks"] if isinstance(stored, dict) else stored
    failures = 0
    choices = {choice for task in tasks for choice in task["predictions"][0]["result"][0]["value"]["choices"]}
    with_prediction = served = 0
    for task in stored:
        predictions = session.get(f"{url}/api/predictions", params={"task": task["id"]}).json()
        labels = [choice for prediction in predictions for item in prediction["result"]
                  for choice in item["value"]["choices"]]
        if len(predictions) == 1 and labels and set(labels) <= choices:
            with_prediction += 1
        image = session.get(url + task["data"]["image"])
        path = out / task["data"]["image"].split("?d=", 1)[1]
        if image.ok and image.content == path.read_bytes():
            served += 1
    print(f"tasks with their prediction {with_prediction}/{len(stored)}; images served byte for byte "
          f"{served}/{len(stored)}")
    failures += (with_prediction != len(tasks)) + (served != len(tasks)) + (len(stored) != len(tasks))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
