"""Run a command while N other processes keep the cores busy (races show under load):

    python tests/busy.py 2 -- python -m pytest -q tests/test_faults.py

Each busy process spins at normal priority until the command ends; then they are stopped (by
their pids) and the command's exit status is returned."""
from __future__ import annotations

import subprocess
import sys

SPIN = "while True: pass"


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(int(argv[0]))]
    try:
        return subprocess.call(argv[2:])
    finally:
        for p in spinners:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
