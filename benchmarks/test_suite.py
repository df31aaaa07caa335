"""The wall time of the README's test command (`pytest`, the default suite without `-m slow`), and
its slowest tests, so that the suite stays quick enough to run many times a day.

    python benchmarks/test_suite.py
"""

import re
import subprocess
import sys
import time

import record


def main() -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--durations=5"], cwd=record.ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(done.stdout[-3000:])
    summary = re.search(r"(\d+) passed.*? in ", done.stdout)
    slowest = re.findall(r"^([\d.]+)s (call|setup) +(\S+)$", done.stdout, re.MULTILINE)
    rows = [["`pytest` (the README's test command)", round(seconds / 60, 2),
             int(summary.group(1)) if summary else None, "passed" if done.returncode == 0
             else f"failed (exit {done.returncode})"]]
    notes = ["slowest: " + "; ".join(f"`{name.split('::')[-1]}` {float(s):.0f} s ({kind})"
                                     for s, kind, name in slowest[:5])] if slowest else []
    record.write("test_suite", "The default test suite", ["command", "minutes", "tests",
                                                         "result"], rows, notes)


if __name__ == "__main__":
    main()
