"""Print, one a line, the uv options that give `uv pip install` the sources pip is set
up with here (its configuration files and PIP_* variables, as `pip config list` shows
them, the variables winning): --index-url, --extra-index-url, --find-links, --constraint.
(setup.sh splits the lines on spaces: none of these values holds one.)"""

import subprocess
import sys

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings: dict[str, str] = {}
for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):  # the variables last: they win
    key, _, value = line.partition("=")
    settings[key.rpartition(".")[2]] = value.strip().strip("'\"")
for name, option in OPTIONS.items():
    for value in settings.get(name, "").split():
        print(option, value)
