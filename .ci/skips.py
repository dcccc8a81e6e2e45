"""Fail on any skipped test that .ci/allowed-skips does not explain.

    python3 .ci/skips.py PYTEST_OUTPUT_FILE

Reads the "SKIPPED [n] file:line: reason" lines of pytest's -ra summary
(pyproject's addopts asks for it), prints them all, and exits 1 if a reason
matches none of the patterns in .ci/allowed-skips (one regular expression a
line; '#' starts a comment). A skip for a missing tool is never allowed:
.ci/run installs every tool the suite uses.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):(\d+): (.*)$")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    allowed = []
    for raw in (Path(__file__).with_name("allowed-skips")).read_text("utf-8").splitlines():
        pattern = raw.split("#", 1)[0].strip()
        if pattern:
            allowed.append(re.compile(pattern))
    total = unexplained = 0
    for line in Path(argv[0]).read_text("utf-8", errors="replace").splitlines():
        m = LINE.match(line.strip())
        if m is None:
            continue
        count, reason = int(m.group(1)), m.group(4)
        total += count
        ok = any(p.search(reason) for p in allowed)
        unexplained += 0 if ok else count
        print(f"  {'allowed' if ok else 'NOT ALLOWED'}: {count} x {m.group(2)}: {reason}")
    print(f"skips: {total} skipped, {unexplained} not explained by .ci/allowed-skips")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
