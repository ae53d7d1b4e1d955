"""Building IMMUNE's BPF object and loading it with libbpf through ctypes.

The object is built from ``bpf/immune.bpf.c`` on first use: ``bpftool``
dumps the running kernel's BTF as ``vmlinux.h``, ``clang -target bpf``
compiles against it, and the result is kept in a cache directory
(``$IMMUNE_BPF_CACHE``, else ``~/.cache/immune/bpf``) under a name made of
the source's SHA-256 and the kernel release, so a new source or kernel
builds afresh. ``python -m immune.agent.libbpf`` builds it ahead of time.

Only the few libbpf calls the sensor needs are bound: open, load, attach
every program by its section name, map updates, and the ring buffer.
libbpf 1.x returns NULL and sets errno on failure, which is what is checked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from immune.errors import ImmuneError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "bpf" / "immune.bpf.c"
LIBBPF = "libbpf.so.1"
BTF = Path("/sys/kernel/btf/vmlinux")
TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


class BpfError(ImmuneError):
    """The BPF object could not be built, loaded or attached."""


# --- Building ----------------------------------------------------------------


def cache_dir() -> Path:
    """Where built objects are kept."""
    if os.environ.get("IMMUNE_BPF_CACHE"):
        return Path(os.environ["IMMUNE_BPF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "immune" / "bpf"


def object_path(source: Path = SOURCE) -> Path:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"immune-{digest}-{os.uname().release}.bpf.o"


def _tool(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        msg = f"{name} not found, needed to build the BPF sensor: "
        msg += f"apt-get install {package}"
        raise BpfError(msg)
    return found


def _run(argv: list[str]) -> bytes:
    done = subprocess.run(argv, capture_output=True, check=False, timeout=300)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-2000:]
        raise BpfError(f"{Path(argv[0]).name} failed ({done.returncode}): {err}")
    return done.stdout


def build(source: Path = SOURCE, *, force: bool = False) -> Path:
    """The compiled object for this kernel, built if it is not cached.

    Raises:
        BpfError: no BTF, no clang or bpftool, or the compiler failed; the
            message says which and how to get it.
    """
    target = object_path(source)
    if target.exists() and not force:
        return target
    if not BTF.exists():
        msg = f"{BTF} is missing: the kernel lacks BTF (CONFIG_DEBUG_INFO_BTF)"
        raise BpfError(msg)
    clang = _tool("clang", "clang")
    bpftool = _tool("bpftool", "bpftool")
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        raise BpfError("bpf/bpf_helpers.h not found: apt-get install libbpf-dev")
    target.parent.mkdir(parents=True, exist_ok=True)
    header_dir = target.parent / f"include-{os.uname().release}"
    header_dir.mkdir(exist_ok=True)
    header = header_dir / "vmlinux.h"
    if not header.exists() or force:
        text = _run([bpftool, "btf", "dump", "file", str(BTF), "format", "c"])
        _write_atomic(header, text)
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, "x86")
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    argv = [clang, "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{arch}"]
    argv += ["-I", str(header_dir), "-c", str(source), "-o", str(partial)]
    _run(argv)
    os.replace(partial, target)
    logger.info("BPF object built: %s.", target)
    return target


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def tracefs_mounted() -> bool:
    return any((root / "events").is_dir() for root in TRACEFS)


# --- libbpf through ctypes ---------------------------------------------------

SampleFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)
_PrintFn = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
)
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_print_keep: list[object] = []
#: What libbpf printed lately (a verifier log explains a refused load).
LOG: list[str] = []


def lib() -> ctypes.CDLL:
    """libbpf, loaded once, with the signatures used here declared.

    Raises:
        BpfError: libbpf.so.1 is not installed.
    """
    global _lib
    if _lib is not None:
        return _lib
    try:
        handle = ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as exc:
        raise BpfError(f"{LIBBPF} not found ({exc}): apt-get install libbpf1") from None
    vp, ip, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    signatures: dict[str, tuple[object, list[object]]] = {
        "bpf_object__open_file": (vp, [cp, vp]),
        "bpf_object__load": (ip, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__next_program": (vp, [vp, vp]),
        "bpf_object__find_map_fd_by_name": (ip, [vp, cp]),
        "bpf_program__name": (cp, [vp]),
        "bpf_program__attach": (vp, [vp]),
        "bpf_program__attach_cgroup": (vp, [vp, ip]),
        "bpf_program__section_name": (cp, [vp]),
        "bpf_link__destroy": (ip, [vp]),
        "bpf_map_update_elem": (ip, [ip, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (ip, [ip, vp, vp]),
        "bpf_map_delete_elem": (ip, [ip, vp]),
        "ring_buffer__new": (vp, [ip, SampleFn, vp, vp]),
        "ring_buffer__poll": (ip, [vp, ip]),
        "ring_buffer__free": (None, [vp]),
        "libbpf_set_print": (vp, [_PrintFn]),
    }
    for name, (restype, argtypes) in signatures.items():
        func = getattr(handle, name)
        func.restype = restype
        func.argtypes = argtypes
    _libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, cp, vp]
    printer = _PrintFn(_print)
    _print_keep.append(printer)
    handle.libbpf_set_print(printer)
    _lib = handle
    return handle


def _print(level: int, fmt: bytes, args: int) -> int:
    # libbpf hands a printf format and a va_list; vsnprintf formats it.
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    line = buf.value.decode(errors="replace").rstrip()
    LOG.append(line)
    del LOG[:-200]
    logger.debug("libbpf: %s", line)
    return 0


def _errno_error(what: str, err: int | None = None) -> BpfError:
    code = abs(err) if err else ctypes.get_errno()
    hint = ""
    if code in (errno.EPERM, errno.EACCES):
        hint = " (needs root or CAP_BPF and CAP_PERFMON)"
    detail = "\n".join(LOG[-20:])
    return BpfError(
        f"{what}: {os.strerror(code)}{hint}" + (f"\n{detail}" if detail else "")
    )


class BpfObject:
    """A loaded BPF object with all its programs attached.

    Args:
        path: the compiled object.
        before_load: called with this object once it is open, before load.

    Raises:
        BpfError: libbpf refused to open, load (the verifier's log is in the
            message) or attach it.
    """

    def __init__(self, path: Path) -> None:
        self.lib = lib()
        self.links: list[int] = []
        del LOG[:]
        obj = self.lib.bpf_object__open_file(str(path).encode(), None)
        if not obj:
            raise _errno_error(f"cannot open BPF object {path}")
        self.obj: int | None = obj
        try:
            rc = self.lib.bpf_object__load(obj)
            if rc:
                raise _errno_error("the kernel refused IMMUNE's BPF programs", rc)
            self._attach_all()
        except BaseException:
            self.close()
            raise

    def _programs(self) -> list[tuple[int, str]]:
        found = []
        prog = self.lib.bpf_object__next_program(self.obj, None)
        while prog:
            found.append((prog, self.lib.bpf_program__section_name(prog).decode()))
            prog = self.lib.bpf_object__next_program(self.obj, prog)
        return found

    def _attach_all(self) -> None:
        """Attach every program but the cgroup ones (see attach_cgroup)."""
        for prog, section in self._programs():
            if section.startswith("cgroup/"):
                continue
            link = self.lib.bpf_program__attach(prog)
            if not link:
                name = self.lib.bpf_program__name(prog).decode()
                raise _errno_error(f"cannot attach BPF program {name}")
            self.links.append(link)

    def attach_cgroup(self, path: str) -> list[int]:
        """Attach the cgroup programs to the cgroup (v2) directory ``path``.

        Returns:
            Their links, for :meth:`detach`.

        Raises:
            BpfError: the cgroup cannot be opened or the kernel refused.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise BpfError(f"cannot open cgroup {path}: {exc.strerror}") from None
        links: list[int] = []
        try:
            for prog, section in self._programs():
                if not section.startswith("cgroup/"):
                    continue
                link = self.lib.bpf_program__attach_cgroup(prog, fd)
                if not link:
                    self.detach(links)
                    raise _errno_error(f"cannot attach {section} to {path}")
                links.append(link)
        finally:
            os.close(fd)
        return links

    def detach(self, links: list[int]) -> None:
        for link in links:
            self.lib.bpf_link__destroy(link)
        links.clear()

    def map_fd(self, name: str) -> int:
        fd = int(self.lib.bpf_object__find_map_fd_by_name(self.obj, name.encode()))
        if fd < 0:
            raise BpfError(f"BPF map {name} not found in the object")
        return fd

    def update(self, fd: int, key: bytes, value: bytes) -> None:
        rc = self.lib.bpf_map_update_elem(fd, key, value, 0)
        if rc:
            raise _errno_error("BPF map update failed", rc)

    def delete(self, fd: int, key: bytes) -> bool:
        return int(self.lib.bpf_map_delete_elem(fd, key)) == 0

    def lookup(self, fd: int, key: bytes, size: int) -> bytes | None:
        value = ctypes.create_string_buffer(size)
        if self.lib.bpf_map_lookup_elem(fd, key, value):
            return None
        return value.raw

    def close(self) -> None:
        for link in self.links:
            self.lib.bpf_link__destroy(link)
        self.links.clear()
        if self.obj:
            self.lib.bpf_object__close(self.obj)
            self.obj = None


class RingBuffer:
    """libbpf's reader of a BPF ring buffer map, calling ``on_sample``.

    Args:
        fd: the ring buffer map's descriptor.
        on_sample: called on the polling thread with each record's bytes.
    """

    def __init__(self, fd: int, on_sample: Callable[[bytes], None]) -> None:
        self.lib = lib()
        self._on_sample = on_sample
        self._callback = SampleFn(self._sample)
        rb = self.lib.ring_buffer__new(fd, self._callback, None, None)
        if not rb:
            raise _errno_error("cannot create the ring buffer reader")
        self.rb: int | None = rb

    def _sample(self, _ctx: int, data: int, size: int) -> int:
        try:
            self._on_sample(ctypes.string_at(data, size))
        except Exception:
            logger.exception("BPF record of %d bytes could not be handled.", size)
        return 0

    def poll(self, timeout_ms: int) -> int:
        """Handle what is ready, waiting up to ``timeout_ms``; the count."""
        n = int(self.lib.ring_buffer__poll(self.rb, timeout_ms))
        if n < 0 and -n != errno.EINTR:
            raise _errno_error("ring_buffer__poll failed", n)
        return max(n, 0)

    def free(self) -> None:
        if self.rb:
            self.lib.ring_buffer__free(self.rb)
            self.rb = None


def main() -> int:
    """Build the object (``python -m immune.agent.libbpf [--force]``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(build(force="--force" in sys.argv[1:]))
    except BpfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
