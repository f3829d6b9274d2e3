"""Print the uv options that give `uv pip install` the sources pip is set up with here
(its configuration files and PIP_* variables, as `pip config list` shows them), one
word a line: --index-url, --extra-index-url, --find-links, --constraint, --no-index.
pip's precedence: the [global] section, then [install], then the variables."""

import ast
import subprocess
import sys

OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}
SECTIONS = ("global.", "install.", ":env:.")  # the later wins

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
settings: dict[str, str] = {}
for section in SECTIONS:
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.startswith(section):
            settings[key[len(section):]] = ast.literal_eval(value)  # pip prints each value's repr
for name, option in OPTIONS.items():
    for value in settings.get(name, "").split():
        print(option, value, sep="\n")
if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
    print("--no-index")
