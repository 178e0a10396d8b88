"""Fail when pip's log of an install shows it backtracking: more than one version of a package fetched (a wheel,
an sdist or just its metadata, downloaded or from pip's cache), or pip's own "looking at multiple versions" notice.

    pip install --log pip.log -e '.[test]' && python .ci/no_backtracking.py pip.log

The test extras pin moto's and s3fs's shared botocore stack (pyproject.toml) so that pip resolves it at once;
this keeps it that way when a new release lands.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

# "Downloading https://.../boto3-1.43.117-py3-none-any.whl (139 kB)", "Using cached boto3-1.43.117-py3-none-any.whl.metadata",
# "Downloading pycocotools-2.0.10.tar.gz": a distribution file's name and version
FETCHED = re.compile(r"(?:Downloading|Using cached) (?:\S*/)?([A-Za-z0-9][A-Za-z0-9_.]*?)-(\d[^-\s]*?)(?:-[^\s]*\.whl|\.tar\.gz|\.zip)")
BACKTRACKING = "pip is looking at multiple versions of"


def versions_fetched(lines) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        for name, version in FETCHED.findall(line):
            seen[re.sub(r"[-_.]+", "-", name).lower()].add(version)
    return seen


def main(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    seen = versions_fetched(lines)
    many = {name: sorted(v) for name, v in seen.items() if len(v) > 1}
    notices = sorted({line.split(BACKTRACKING, 1)[1].split()[0] for line in lines if BACKTRACKING in line})
    if many or notices:
        print(f"no-backtracking: pip backtracked: {many or ''} {('looked at multiple versions of ' + ', '.join(notices)) if notices else ''}")
        return 1
    if not seen:  # a second run into the same venv: everything was installed already
        print(f"no-backtracking: {path} shows nothing fetched")
        return 0
    print(f"no-backtracking: {len(seen)} distributions, one version each (boto3 {', '.join(sorted(seen.get('boto3', {'not fetched'})))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
