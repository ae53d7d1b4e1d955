"""The kernel module's cost per hooked operation, in Debian's 6.1 kernel.

Boots the test guest of tests/kmod (QEMU, TCG) with
kernel/immune_kmod/tests/bench_init.sh as /init, which times opens of an
ordinary file and of a sensitive one, connects and forks: without the
module, with it in audit mode, with it loaded but disabled, and after
unloading it (after a warm-up round for QEMU's translation cache). Each boot
prints ns per operation; the script repeats the boot and reports medians.
TCG emulates the CPU, so absolute figures are far above a real machine's:
read the ratios, and the "none" and "unloaded" columns for the drift.

    .venv/bin/python benchmarks/kmod_overhead.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kmod"))

from kmodguest import KMOD, boot, build, find_tools  # noqa: E402 (after sys.path)

OPS = ("open /init", "open /etc/shadow", "connect", "fork")


def one_run(tools, built, work: Path, accel: str) -> dict[tuple[str, str], int]:
    run = boot(built, tools, work, KMOD / "tests" / "bench_init.sh", accel)
    figures: dict[tuple[str, str], int] = {}
    phase = "?"
    opens = 0
    for line in run.console.replace("\r", "").split("\n"):
        if line.startswith("PHASE "):
            phase, opens = line.split()[1], 0
        elif line.startswith("BENCH "):
            fields = dict(f.split("=") for f in line.split()[2:])
            what = line.split()[1]
            if what == "open":
                what = OPS[opens]
                opens += 1
            figures[(phase, what)] = int(fields["ns_per_op"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--accel", default="tcg", help="QEMU accelerator (kvm)")
    args = parser.parse_args()
    tools = find_tools()
    with tempfile.TemporaryDirectory() as tmp:
        built = build(tools, Path(tmp))
        runs = []
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            runs.append(one_run(tools, built, work, args.accel))
    print(
        f"kernel {tools.version}, {args.accel}, {args.runs} boots, "
        "median [min-max] ns/op"
    )
    print("| operation | none | audit | disabled | unloaded | audit / none |")
    print("|---|---|---|---|---|---|")
    for op in OPS:
        cells = []
        medians = {}
        for phase in ("none", "audit", "disabled", "unloaded"):
            values = [r[(phase, op)] for r in runs]
            medians[phase] = statistics.median(values)
            cells.append(f"{medians[phase]:,.0f} [{min(values):,}-{max(values):,}]")
        ratio = medians["audit"] / medians["none"]
        print(f"| {op} | {' | '.join(cells)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
