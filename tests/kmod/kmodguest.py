"""Helpers of the kernel module tests (fixtures in conftest.py).

The module is built against Debian's 6.1 headers (``linux-headers-amd64``)
and loaded in that very kernel, booted once per test session in
``qemu-system-x86_64 -accel tcg`` with a busybox initramfs whose ``/init``
(``kernel/immune_kmod/tests/guest_init.sh``) triggers every hook in audit
mode and in block mode and prints what happened on the serial console. The
tests read that console. ``.ci/run`` installs the packages and runs
``kernel/immune_kmod/tests/fetch-kernel.sh``, which puts the matching
``vmlinuz`` and ``checkpatch.pl`` in ``/var/cache/immune-kmod``.

Without those tools the tests skip, saying what is missing; in CI (``CI`` or
``IMMUNE_REQUIRE_SERVICES=1``) they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from immune.agent.kmod import KmodPolicy, Record, apply_policy, decode_record

ROOT = Path(__file__).resolve().parents[2]
KMOD = ROOT / "kernel" / "immune_kmod"
CACHE = Path(os.environ.get("IMMUNE_KMOD_CACHE", "/var/cache/immune-kmod"))
FETCH = "bash kernel/immune_kmod/tests/fetch-kernel.sh"
BOOT_TIMEOUT = 300

#: The policy the test pushes in the guest's last phase, through the files
#: that immune.agent.kmod.apply_policy writes.
TUNED_POLICY = KmodPolicy(
    enabled=True,
    block_mode=True,
    log_level=2,
    exec_dirs=["/opt/drop/"],
    patterns=["nc ", "| sh", "python3 -c"],
    files=["/etc/shadow", ".ssh/id_rsa"],
    ports=[7777, 31337],
)
TUNABLES = (
    "enabled",
    "block_mode",
    "monitor_network",
    "monitor_files",
    "monitor_credentials",
    "log_level",
    "exec_dirs",
    "patterns",
    "files",
    "ports",
)


def required() -> bool:
    """True in CI, where a missing tool is a failure, not a skip."""
    return (
        bool(os.environ.get("CI")) or os.environ.get("IMMUNE_REQUIRE_SERVICES") == "1"
    )


def unavailable(reason: str) -> None:
    if required():
        pytest.fail(f"{reason} (CI: .ci/run should have installed it)")
    pytest.skip(reason)


#: Debian's generic amd64 flavour (not -cloud-amd64 or -rt-amd64).
HEADERS = re.compile(r"^linux-headers-(\d+\.\d+\.\d+-\d+)-amd64$")


def _version_key(path: Path) -> list[int]:
    match = HEADERS.match(path.name)
    assert match is not None
    return [int(x) for x in re.findall(r"\d+", match.group(1))]


@dataclass(frozen=True)
class KernelTools:
    """What building and booting the module needs."""

    version: str
    headers: Path
    vmlinuz: Path
    qemu: str
    busybox: Path


def _is_static(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(8192)
    return head[:4] == b"\x7fELF" and b"ld-linux" not in head


def find_tools() -> KernelTools:
    """Find the headers, the matching kernel, QEMU and a static busybox."""
    for tool, package in (("gcc", "gcc"), ("make", "make"), ("cpio", "cpio")):
        if shutil.which(tool) is None:
            unavailable(f"{tool} not found: apt-get install {package}")
    found = sorted(
        (
            p
            for p in Path("/usr/src").glob("linux-headers-*-amd64")
            if HEADERS.match(p.name)
        ),
        key=_version_key,
    )
    if not found:
        unavailable("no Debian kernel headers: apt-get install linux-headers-amd64")
    headers = found[-1]
    version = headers.name.removeprefix("linux-headers-")
    candidates = [
        Path(os.environ.get("IMMUNE_KMOD_VMLINUZ", "/nonexistent")),
        Path(f"/boot/vmlinuz-{version}"),
        CACHE / f"vmlinuz-{version}",
    ]
    vmlinuz = next((p for p in candidates if p.is_file()), None)
    if vmlinuz is None:
        unavailable(f"no vmlinuz-{version} to boot: run {FETCH}")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        unavailable("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    busybox = Path("/bin/busybox")
    if not busybox.is_file() or not _is_static(busybox):
        unavailable("no static /bin/busybox: apt-get install busybox-static")
    assert vmlinuz is not None and qemu is not None
    return KernelTools(version, headers, vmlinuz, qemu, busybox)


def run(argv: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    """Run a build step; its output is in the assertion if it fails."""
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@dataclass(frozen=True)
class Built:
    """The module and the guest's probe, built in a directory of the test."""

    module: Path
    probe: Path
    build_log: str


def build(kernel_tools: KernelTools, work: Path) -> Built:
    """Build the module and the guest's probe in a new directory."""
    src = work / "immune_kmod"
    shutil.copytree(KMOD, src, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*"))
    log = run(["make", f"KDIR={kernel_tools.headers}"], cwd=src)
    probe = src / "guest_probe"
    run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(probe),
         str(src / "tests" / "guest_probe.c")])  # fmt: skip
    return Built(src / "immune.ko", probe, log)


@dataclass
class Step:
    """One STEP of the guest's /init: its RESULT lines and other output."""

    name: str
    results: list[dict[str, str]] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)

    def result(self, what: str) -> dict[str, str]:
        found = [r for r in self.results if r["what"] == what]
        assert found, f"no RESULT {what} in step {self.name}: {self.output}"
        return found[-1]


@dataclass
class GuestRun:
    """What the guest printed, parsed."""

    console: str
    returncode: int
    steps: dict[str, Step]
    tunables: dict[str, list[str]]
    raw_records: list[bytes]
    dmesg: list[str]
    kernel_errors: list[str]

    def step(self, name: str) -> Step:
        assert name in self.steps, f"step {name} never ran:\n{self.console[-3000:]}"
        return self.steps[name]

    @property
    def records(self) -> list[Record]:
        return [r for s in self.steps.values() for r in s.records]


def parse_console(console: str, returncode: int) -> GuestRun:
    steps: dict[str, Step] = {}
    current = steps.setdefault("boot", Step("boot"))
    tunables: dict[str, list[str]] = {}
    raw: list[bytes] = []
    dmesg: list[str] = []
    errors: list[str] = []
    for line in console.replace("\r", "").split("\n"):
        tag, _, rest = line.partition(" ")
        if tag == "STEP":
            current = steps.setdefault(rest, Step(rest))
        elif tag == "RESULT":
            what, *pairs = rest.split()
            fields = dict(p.split("=", 1) for p in pairs)
            current.results.append({"what": what, **fields})
        elif tag == "REC":
            data = bytes.fromhex(rest.strip())
            raw.append(data)
            current.records.append(decode_record(data))
        elif tag == "TUNABLE":
            name, _, value = rest.partition(" ")
            tunables.setdefault(name, []).append(value)
        elif tag == "DMESG":
            dmesg.append(rest)
        elif tag == "KERN":
            errors.append(rest)
        else:
            current.output.append(line)
    return GuestRun(console, returncode, steps, tunables, raw, dmesg, errors)


def make_initramfs(
    built: Built, tools: KernelTools, root: Path, init_script: Path
) -> Path:
    """The guest's root: busybox, the probe, the module, the policy files."""
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "policy"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(tools.busybox, root / "bin" / "busybox")
    shutil.copy2(built.probe, root / "bin" / "guest_probe")
    shutil.copy2(built.module, root / "immune.ko")
    init = root / "init"
    shutil.copy2(init_script, init)
    init.chmod(0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    for name in TUNABLES:
        (root / "policy" / name).touch()
    apply_policy(TUNED_POLICY, root / "policy")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    image = root.parent / "initrd.cpio"
    with image.open("wb") as out:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input="\n".join([".", *files]).encode(),
            stdout=out,
            check=True,
        )
    return image


GUEST_INIT = KMOD / "tests" / "guest_init.sh"


def boot(
    built: Built,
    kernel_tools: KernelTools,
    work: Path,
    init_script: Path = GUEST_INIT,
    accel: str = "tcg",
) -> GuestRun:
    """One boot of the Debian kernel with the module: everything it printed."""
    image = make_initramfs(built, kernel_tools, work / "root", init_script)
    argv = [
        kernel_tools.qemu,
        "-accel", accel, "-m", "512", "-smp", "2",
        "-kernel", str(kernel_tools.vmlinuz), "-initrd", str(image),
        "-append", "console=ttyS0 quiet loglevel=4 panic=-1",
        "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=BOOT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"the guest did not power off in {BOOT_TIMEOUT} s:\n{out[-3000:]}")
    console = proc.stdout.decode(errors="replace")
    (work / "console.log").write_text(console)
    return parse_console(console, proc.returncode)
