"""The fused CPU kernels in ``mann/csrc``: built once per machine with the local C++ compiler, then loaded.

Why plain loops and not ATen ops called from C++: on a CPU each small ATen op costs ~3-7 us whoever calls it (a
12-op chain took 86 us from Python, 101 us from C++), so the kernels loop over one batch row (see ntm_heads.cpp).

Building uses torch.utils.cpp_extension (g++ and ninja; ~30 s per kernel on 2 cores) into a folder named by a hash
of the source, torch's version and the flags, under ``$MANN_NATIVE_DIR`` (default ``~/.cache/mannstudy/native``).
A later process that finds the built library there imports it directly (milliseconds), so a sweep's workers pay
the build once per machine, and only if ``python -m mann.native`` (cluster.yaml's setup runs it) has not.

``MANN_NATIVE=0`` turns the kernels off; then, and where they cannot be built (a warning says why, once per
process), mann.dispatch runs the reference models.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = {"ntm_heads": Path(__file__).parent / "csrc" / "ntm_heads.cpp",
           "lstm_cell": Path(__file__).parent / "csrc" / "lstm_cell.cpp",
           "dnc_step": Path(__file__).parent / "csrc" / "dnc_step.cpp"}


# at::parallel_for is a header template: compiled without -fopenmp it runs its loop on the calling thread, whatever
# torch.get_num_threads() says. Linking -fopenmp asks for libgomp.so.1, which the loader resolves to the copy torch
# already loaded (same soname): one thread pool.
OPENMP = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []


def _cflags() -> list[str]:
    """-O3, plus AVX2 where torch found the CPU capable: then ATen's vector type (at::vec::Vectorized) runs exp
    and log 8 floats at a time. No -march=native: the build folder is named by these flags (see build_dir), so
    nodes whose CPUs differ in this respect build apart even when they share a home folder."""
    flags = os.environ.get("MANN_NATIVE_CFLAGS", "-O3").split()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


SERIAL_CFLAGS = _cflags()  # where the compiler has no OpenMP (build() falls back to these)
CFLAGS = SERIAL_CFLAGS + OPENMP
OPENMP_FAILED = "openmp-failed"  # written into the OpenMP build's folder when that build failed

_loaded: dict[str, ModuleType | None] = {}
_why_not: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get("MANN_NATIVE", "1") not in ("0", "false", "no", "off")


def build_dir(name: str, flags: list[str] | None = None) -> Path:
    """Where ``name``'s library is built with ``flags`` (default CFLAGS): one folder per (source, torch version,
    flags)."""
    flags = CFLAGS if flags is None else flags
    digest = hashlib.sha256()
    digest.update(SOURCES[name].read_bytes())
    for header in sorted(SOURCES[name].parent.glob("*.h")):  # what the sources include: a change rebuilds too
        digest.update(header.read_bytes())
    digest.update(f"{torch.__version__} {sys.version_info[:2]} {flags}".encode())
    root = Path(os.environ.get("MANN_NATIVE_DIR", Path.home() / ".cache" / "mannstudy" / "native"))
    return root / f"{name}-{digest.hexdigest()[:16]}"


STALE_LOCK_S = 600  # a build takes ~35 s: a lock this old was left by a builder that died (killed worker, Ctrl-C)


def _clear_stale_lock(folder: Path) -> None:
    """Remove torch's build lock if its builder is long gone: load() would otherwise wait on it forever (torch's
    FileBaton polls until the file disappears), and every later process with it."""
    lock = folder / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()


def _import_built(name: str, folder: Path) -> ModuleType | None:
    library = folder / f"mann_{name}.so"
    if not library.exists() or (folder / "lock").exists():  # "lock": another process is building it right now
        return None  # (then load() below waits for that build instead of importing a half-written library)
    loader = importlib.machinery.ExtensionFileLoader(f"mann_{name}", str(library))
    spec = importlib.util.spec_from_file_location(f"mann_{name}", library, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build(name: str) -> ModuleType:
    """Build (if not built yet) and load kernel module ``name``; raises if the compiler fails.

    With OpenMP where torch has it. Where that build fails (a compiler without OpenMP, e.g. clang without
    libomp), the kernels are built without it, their rows then on one thread, and a warning says so. A file in
    the failed build's folder makes later processes skip straight to that build (remove the folder to retry).
    """
    serial = build_dir(name, SERIAL_CFLAGS)
    if OPENMP:
        folder = build_dir(name)
        if not (folder / OPENMP_FAILED).exists():
            try:
                return _load(name, folder, CFLAGS, OPENMP)
            except Exception as exc:
                # raises here if the build fails without OpenMP too (no compiler at all): then nothing is marked,
                # and a later process, perhaps after the compiler was installed, tries OpenMP again
                module = _load(name, serial, SERIAL_CFLAGS, [])
                folder.mkdir(parents=True, exist_ok=True)
                (folder / OPENMP_FAILED).write_text(str(exc)[-4000:])
                warnings.warn(f"mann.native: the {name} kernels could not be built with OpenMP ({_last_line(exc)}); "
                              f"built without, their batch rows run on one thread (remove {folder} to try again)",
                              RuntimeWarning, stacklevel=2)
                return module
    return _load(name, serial, SERIAL_CFLAGS, [])


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def _load(name: str, folder: Path, cflags: list[str], ldflags: list[str]) -> ModuleType:
    """Import ``name``'s library built with these flags in ``folder``, building it first if need be."""
    _clear_stale_lock(folder)
    module = _import_built(name, folder)
    if module is not None:
        return module
    import ninja
    from torch.utils.cpp_extension import load

    # torch runs `ninja` from PATH, where the venv's bin folder (the ninja package's binary) may not be
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    folder.mkdir(parents=True, exist_ok=True)
    print(f"mann.native: building the {name} kernels for this machine in {folder} (once; ~35 s)", file=sys.stderr,
          flush=True)
    # load() takes a file lock in the folder, so processes building at once wait for one build
    return load(name=f"mann_{name}", sources=[str(SOURCES[name])], extra_cflags=cflags, extra_ldflags=ldflags,
                build_directory=str(folder), verbose=False)


def kernels(name: str) -> ModuleType | None:
    """Kernel module ``name``, or None where it is turned off or cannot be built (a warning says why, once)."""
    if not enabled():
        return None
    if name not in _loaded:
        try:
            _loaded[name] = build(name)
        except Exception as exc:  # a missing compiler, ninja or header: the reference models still run
            _loaded[name] = None
            _why_not[name] = _last_line(exc)
            warnings.warn(f"mann.native: the {name} kernels could not be built, the slower reference models run "
                          f"instead ({_why_not[name]})", RuntimeWarning, stacklevel=2)
    return _loaded[name]


def prepare() -> dict[str, ModuleType | None]:
    """Every kernel, built now where it is not yet (e.g. before a sweep's workers start); those that cannot be
    built are None, with kernels()'s warning."""
    return {name: kernels(name) for name in SOURCES}


def main() -> int:
    """``python -m mann.native``: build every kernel now (e.g. in a cluster node's setup), print where.

    Exit code 0 even where a kernel cannot be built (no C++ compiler): the package runs the reference models
    instead, so a node without a compiler is slower, not broken; a warning on stderr says which and why.
    """
    for name in SOURCES:
        try:
            module = build(name)
        except Exception as exc:
            print(f"mann.native: warning: the {name} kernels could not be built ({_last_line(exc)}); trials on this "
                  "machine run the slower reference models instead", file=sys.stderr, flush=True)
            continue
        print(f"{name}: {Path(module.__file__).parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
