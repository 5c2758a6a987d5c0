"""A build-once disk cache keyed by a config hash, with a completion marker that detects corrupt or partial builds.

Why: the warm start costs minutes; every run of a sweep must reuse it, a changed config must not reuse a stale one,
and a build killed half-way (or a file damaged later) must be rebuilt rather than loaded. A folder is valid only
when its ``COMPLETE`` marker -- written last, listing every file with its size and sha256 -- matches the files.
Builds happen in a private temporary folder renamed into place, so readers never see a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping

MARKER = "COMPLETE"
#: Bump when the build code changes what it produces for the same config, so old caches are not reused.
BUILD_VERSION = 1


def default_cache_dir() -> Path:
    """``$NOISEBENCH_CACHE`` if set, else ``~/.cache/noisebench``."""
    return Path(os.environ.get("NOISEBENCH_CACHE") or Path.home() / ".cache" / "noisebench").expanduser()


def config_hash(cfg: Mapping) -> str:
    """Stable 16-hex-digit hash of a plain (JSON-able) config plus ``BUILD_VERSION``."""
    blob = json.dumps({"build_version": BUILD_VERSION, "cfg": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path, name: str = MARKER) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (name, name + ".tmp"))


def write_marker(folder: Path, name: str = MARKER) -> None:
    """Write the manifest marker ``name`` (call once every other file is in place)."""
    manifest = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in _files(folder, name)}
    tmp = folder / (name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / name)


def problems(folder: Path, name: str = MARKER) -> list[str]:
    """Why ``folder`` is not a complete build (empty list when it is); ``name``: the marker file to check."""
    marker = Path(folder) / name
    if not marker.is_file():
        return [f"{folder}: no {name} marker (never finished)"]
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        return [f"{marker}: unreadable ({e})"]
    out = []
    for rel, want in manifest.items():
        p = Path(folder) / rel
        if not p.is_file():
            out.append(f"{p}: missing")
        elif p.stat().st_size != want["size"] or _sha256(p) != want["sha256"]:
            out.append(f"{p}: size or checksum differs from the marker")
    return out


def cached_build(folder: Path, build: Callable[[Path], None], log: Callable[[str], None] = print) -> Path:
    """Return ``folder``, building it first with ``build(tmp_folder)`` unless it already holds a complete build.

    Args:
        folder (Path): final location, e.g. ``<cache>/testbeds/<name>-<hash>``.
        build (Callable[[Path], None]): fills the (empty, private) folder it is given.
        log (Callable[[str], None]): where to say that a broken cache is being rebuilt.
    """
    folder = Path(folder)
    if folder.exists():
        bad = problems(folder)
        if not bad:
            return folder
        log(f"noisebench: rebuilding cache {folder}: " + "; ".join(bad[:3]))
    _remove_orphans(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _removed_on_signal(tmp):
            build(tmp)
        write_marker(tmp)
        if folder.exists():
            if not problems(folder):  # another process finished the same build first: keep theirs
                shutil.rmtree(tmp)
                return folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_orphans(folder: Path) -> None:
    """Delete ``<name>.tmp-PID`` folders left by builds whose process is gone (a kill -9 runs no cleanup)."""
    for tmp in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _removed_on_signal(tmp: Path):
    """While building: SIGTERM/SIGHUP first delete ``tmp``, then act as they would have (default: end the process;
    a Python handler of the caller's: called). Python's own SIGINT (KeyboardInterrupt) unwinds through ``finally``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        shutil.rmtree(tmp, ignore_errors=True)
        prev = previous[signum]
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
