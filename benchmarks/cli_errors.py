"""Time from the command to the one-line error for misspelled options (issue 22's budget).

Each command runs as a user runs it (``python -m tasks.segment ...`` in a fresh process); the
table gives the median wall time to the error, the error line, and, as the floor any parse
sits on, the time to import the libraries the task's signatures name::

    python -m benchmarks.cli_errors --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "protocol typo": ["fit", "--data.protocol", "pfnet"],
    "dataset typo": ["fit", "--data", "datamodules.PascalFewShott"],
    "dilation scheme typo": ["fit", "--model.backbone.init_args.dilation_scheme", "unifrom"],
    "shots 0": ["fit", "--data.shots", "0"],
    "negative lr": ["fit", "--model.lr", "-0.1"],
}
FLOORS = {
    "import torch": "import torch",
    "import lightning, torchvision": "import lightning.pytorch, torchvision",
    "import tasks.segment": "import tasks.segment",
}


def timed(argv: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return elapsed, done.returncode, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| command | median s | exit | error line |")
    print("|---|---|---|---|")
    for label, command in COMMANDS.items():
        runs = [
            timed([sys.executable, "-m", "tasks.segment", *command]) for _ in range(args.repeats)
        ]
        seconds = statistics.median(run[0] for run in runs)
        _, code, line = runs[-1]
        print(f"| {label}: `{' '.join(command)}` | {seconds:.2f} | {code} | `{line[:160]}` |")
    for label, statement in FLOORS.items():
        runs = [timed([sys.executable, "-c", statement]) for _ in range(args.repeats)]
        print(f"| {label} (floor) | {statistics.median(r[0] for r in runs):.2f} | | |")


if __name__ == "__main__":
    main()
