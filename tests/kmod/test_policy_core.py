"""The portable policy core (kernel/immune_kmod/immune_policy.c) in user space.

Built with the machine's gcc: its C unit tests under ASan and UBSan, a check
that it calls no library function (so that it builds in any kernel), a
hypothesis-driven differential test through ctypes against a Python model
of the rules, and fuzzing on long and hostile inputs: gcc's ASan with a
driver of fixed seed always, and libFuzzer where clang has it.
"""

from __future__ import annotations

import ctypes
import shutil
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
KMOD = ROOT / "kernel" / "immune_kmod"
CORE = KMOD / "immune_policy.c"
TESTS = KMOD / "tests"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]

MAX_ITEMS, ITEM_LEN, MAX_PORTS = 32, 120, 32


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: apt-get install gcc")
    return gcc


def _build(tmp: Path, name: str, sources: list[Path], *flags: str) -> Path:
    out = tmp / name
    argv = [_gcc(), "-Wall", "-Wextra", "-Werror", "-g", *flags, "-o", str(out)]
    proc = subprocess.run(
        [*argv, *map(str, sources)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_core_unit_tests_under_asan(tmp_path: Path):
    exe = _build(tmp_path, "test_policy", [TESTS / "test_policy.c", CORE], *SANITIZE)
    proc = _run([str(exe)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(summary.split(": ")[1].split()[0])
    assert summary.endswith(" 0 failed") and passed >= 70, proc.stdout


def test_core_calls_no_library_function(tmp_path: Path):
    obj = tmp_path / "immune_policy.o"
    flags = ["-ffreestanding", "-fno-builtin", "-O2", "-c"]
    _build(tmp_path, obj.name, [CORE], *flags)
    nm = _run(["nm", "--undefined-only", str(obj)])
    assert nm.returncode == 0, nm.stderr
    assert nm.stdout.strip() == "", f"the core needs symbols: {nm.stdout}"


def test_fuzz_hostile_inputs_gcc_asan(tmp_path: Path):
    exe = _build(tmp_path, "fuzz", [TESTS / "fuzz_policy.c", CORE], "-O1", *SANITIZE)
    proc = _run([str(exe), "20000"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "20000 inputs, no crash" in proc.stdout


def test_fuzz_libfuzzer(tmp_path: Path):
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not installed: libFuzzer not run (the gcc ASan fuzz ran)")
    exe = tmp_path / "fuzz"
    build = _run(
        [clang, "-g", "-O1", "-DIMM_LIBFUZZER", "-fsanitize=fuzzer,address,undefined",
         "-o", str(exe), str(TESTS / "fuzz_policy.c"), str(CORE)]
    )  # fmt: skip
    if build.returncode != 0 and "fuzzer" in build.stderr:
        pytest.skip(f"clang without libFuzzer: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = [
        b"\x03/bin/sh -c nc 10.0.0.1 4444",
        b"\x02/tmp/" + b"A" * 5000,
        b"\x04/home/a/.ssh/id_rsa",
        b"\x01" + b"4444," * 40,
        b"\x00" + b"x" * 119 + b"\n" + b"y" * 120,
        b"\x05" + bytes(range(256)),
    ]
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    proc = _run(
        [str(exe), "-max_total_time=15", "-seed=1", "-max_len=70000", str(corpus)],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr


# --- Differential tests through ctypes ----------------------------------------


class ImmList(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint),
        ("len", ctypes.c_ubyte * MAX_ITEMS),
        ("item", (ctypes.c_char * ITEM_LEN) * MAX_ITEMS),
    ]


class ImmPolicy(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int) for name in ("enabled", "block_mode", "net", "files",
                                             "creds", "log_level")),
        ("exec_dirs", ImmList),
        ("patterns", ImmList),
        ("files_list", ImmList),
        ("nports", ctypes.c_uint),
        ("ports", ctypes.c_ushort * MAX_PORTS),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    tmp = tmp_path_factory.mktemp("core")
    lib = _build(tmp, "libimmpolicy.so", [CORE], "-O1", "-shared", "-fPIC")
    dll = ctypes.CDLL(str(lib))
    sz = ctypes.c_size_t
    for name in ("imm_match_exec_dir", "imm_match_pattern", "imm_match_file",
                 "imm_file_candidate"):  # fmt: skip
        getattr(dll, name).argtypes = [ctypes.POINTER(ImmPolicy), ctypes.c_char_p, sz]
    dll.imm_list_parse.argtypes = [ctypes.POINTER(ImmList), ctypes.c_char_p, sz]
    dll.imm_ports_parse.argtypes = [
        ctypes.POINTER(ctypes.c_ushort),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_char_p,
        sz,
    ]
    dll.imm_port_blocked.argtypes = [ctypes.POINTER(ImmPolicy), ctypes.c_uint]
    return dll


def _exact(data: bytes) -> ctypes.Array[ctypes.c_char]:
    """A buffer of exactly len(data) bytes: no terminating NUL to lean on."""
    return ctypes.create_string_buffer(data, max(len(data), 1))


def _policy(core: ctypes.CDLL, field: str, items: list[bytes]) -> ImmPolicy:
    policy = ImmPolicy()
    core.imm_policy_defaults(ctypes.byref(policy))
    text = b"".join(item + b"\n" for item in items)
    n = core.imm_list_parse(
        ctypes.byref(getattr(policy, field)), _exact(text), len(text)
    )
    assert n == len(items)
    return policy


WORD_START = set(b" /|;&(`\t")
WORD_CHARS = set((string.ascii_letters + string.digits).encode())


def model_pattern(patterns: list[bytes], cmd: bytes) -> int:
    """The rule of immune_policy.h: first pattern found, word-anchored."""
    for i, pat in enumerate(patterns):
        for at in range(len(cmd) - len(pat) + 1):
            if cmd[at : at + len(pat)] != pat:
                continue
            if pat[0] in WORD_CHARS and at and cmd[at - 1] not in WORD_START:
                continue
            return i
    return -1


def model_file(files: list[bytes], path: bytes) -> int:
    for i, entry in enumerate(files):
        if entry.startswith(b"/"):
            if path == entry:
                return i
        elif len(path) > len(entry) and path.endswith(b"/" + entry):
            return i
    return -1


item = st.binary(min_size=1, max_size=ITEM_LEN - 1).filter(
    lambda b: b"\n" not in b and b"\0" not in b
)
short = st.sampled_from([b"nc ", b"| sh", b"/tmp/", b".ssh/id_rsa", b"a", b"/etc/x"])
items = st.lists(st.one_of(item, short), min_size=1, max_size=MAX_ITEMS)
subject = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from([b"nc ", b"x", b" ", b"/", b"| sh", b".ssh/id_rsa"]))
    .map(b"".join),
)  # fmt: skip
FAST = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FAST
@given(patterns=items, cmd=subject)
def test_pattern_matching_matches_the_model(core, patterns, cmd):
    policy = _policy(core, "patterns", patterns)
    got = core.imm_match_pattern(ctypes.byref(policy), _exact(cmd), len(cmd))
    assert got == model_pattern(patterns, cmd)


@FAST
@given(dirs=items, path=subject)
def test_exec_dir_is_a_prefix_match(core, dirs, path):
    policy = _policy(core, "exec_dirs", dirs)
    got = core.imm_match_exec_dir(ctypes.byref(policy), _exact(path), len(path))
    want = next((i for i, d in enumerate(dirs) if path.startswith(d)), -1)
    assert got == want


@FAST
@given(files=items, path=subject)
def test_sensitive_files_match_the_model(core, files, path):
    policy = _policy(core, "files_list", files)
    got = core.imm_match_file(ctypes.byref(policy), _exact(path), len(path))
    assert got == model_file(files, path)
    if got >= 0:  # whatever matches passes the cheap test on its base name
        base = path.rsplit(b"/", 1)[-1]
        assert core.imm_file_candidate(ctypes.byref(policy), _exact(base), len(base))


@FAST
@given(ports=st.lists(st.integers(1, 65535), max_size=MAX_PORTS),
       probe=st.integers(0, 2**32 - 1),
       sep=st.sampled_from([b",", b" ", b"\n", b", "]))  # fmt: skip
def test_ports_parse_and_compare_as_numbers(core, ports, probe, sep):
    policy = ImmPolicy()
    text = sep.join(str(p).encode() for p in ports)
    n = ctypes.c_uint(99)
    got = core.imm_ports_parse(policy.ports, ctypes.byref(n), _exact(text), len(text))
    assert got == len(ports) == n.value
    policy.nports = n.value
    assert list(policy.ports[: n.value]) == ports
    for port in [*ports, probe]:
        assert bool(core.imm_port_blocked(ctypes.byref(policy), port)) == (
            port in ports
        )


@FAST
@given(text=st.binary(max_size=400))
def test_bad_port_lists_refused_whole(core, text):
    ports = (ctypes.c_ushort * MAX_PORTS)()
    n = ctypes.c_uint(77)
    got = core.imm_ports_parse(ports, ctypes.byref(n), _exact(text), len(text))
    words = text.replace(b",", b" ").split()
    valid = (
        all(w.isdigit() and 1 <= int(w) <= 65535 for w in words)
        and len(words) <= MAX_PORTS
        and set(text) <= set(b"0123456789, \n\t")
    )
    if valid:
        assert got == len(words) == n.value
    else:
        assert got < 0 and n.value == 77


@FAST
@given(text=st.binary(max_size=6000))
def test_list_parse_never_overflows(core, text):
    lst = ImmList()
    got = core.imm_list_parse(ctypes.byref(lst), _exact(text), len(text))
    lines = [line for line in text.split(b"\n") if line]
    if b"\0" in text:
        assert got == -22
    elif len(lines) > MAX_ITEMS or any(len(x) >= ITEM_LEN for x in lines):
        assert got == -7 and lst.count == 0
    else:
        assert got == len(lines) == lst.count
        assert [bytes(lst.item[i])[: lst.len[i]] for i in range(got)] == lines
