"""Native CPU kernels: C sources in ``blocks/csrc``, compiled once and loaded with ctypes.

Some hot paths are a recurrence over a state that fits in cache, where any composition of torch
operators has to write batch x seq x state tensors to memory and read them back several times
(Mamba's selective scan: ~30 passes over 67 MB per block and step at the protocol's sizes). A
loop in C keeps the state in registers and cache instead. Each kernel keeps its torch twin and a
slow reference, and the tests compare all three.

How it works:

* :func:`library` compiles ``blocks/csrc/<name>.c`` with the system C compiler (``$CC``, ``cc`` or
  ``gcc``; ``-O3 -march=native``, float re-association allowed so reductions vectorise, NaN and
  infinities kept) into a shared library cached under the task-data cache
  (``$MAD_SEARCH_CACHE/native``), keyed by the source, the flags, the compiler and the CPU's
  feature flags. The first use on a machine takes about a second; concurrent workers may both
  compile, and the atomic rename means none loads a half-written file.
* Where that is impossible (no compiler, a failed build, not Linux or macOS) the torch path runs
  and one line on stderr says why, once per process. ``MAD_SEARCH_NATIVE=0`` turns the kernels
  off (the torch paths run; for measuring the difference).
* ctypes releases the GIL during a call, so :func:`parallel` splits the batch over
  ``torch.get_num_threads()`` Python threads: a pool worker (one torch thread) runs one, a
  serial run with two threads runs two, and the pool never oversubscribes the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ENV = "MAD_SEARCH_NATIVE"
SOURCES = Path(__file__).parent / "csrc"
# -ffp-contract=fast: fused multiply-adds (ISO C mode would forbid them: half the instructions)
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math", "-fPIC", "-shared", "-std=c99")
if platform.machine().lower() in ("x86_64", "amd64"):
    # 8-float vectors even where AVX-512 exists: the sLSTM's loops run over a head's units (8 at
    # the default study's width), which a 16-float loop would leave to its scalar remainder
    FLAGS += ("-mprefer-vector-width=256",)

_libraries: dict[str, ctypes.CDLL | None] = {}
status: dict[str, str] = {}  # kernel name -> "native" or "torch: <reason>", for reports
_pool: ThreadPoolExecutor | None = None


def enabled() -> bool:
    """False when ``MAD_SEARCH_NATIVE`` is 0/off/false/no."""
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "off", "false", "no"}


I64, F32, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p  # kernel argument types


def library(name: str, signatures: dict[str, list] | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` (``csrc/<name>.c``), or None (torch path).

    ``signatures`` maps each kernel function to its argument types (``I64``, ``F32``, ``PTR``);
    they are set when the library is first loaded, and every kernel returns nothing.
    """
    if name in _libraries:
        return _libraries[name]
    lib, why = None, None
    if not enabled():
        why = f"{ENV}={os.environ.get(ENV)}"
    elif not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        why = f"no native kernels on {sys.platform}"
    else:
        try:
            lib = ctypes.CDLL(str(_build(name)))
        except (OSError, RuntimeError) as exc:
            why = str(exc)
            print(f"mad-search: native {name} kernel unavailable ({why}); using the torch path",
                  file=sys.stderr)
    if lib is not None and signatures:
        _set_signatures(lib, signatures)
    status[name] = "native" if lib is not None else f"torch: {why}"
    _libraries[name] = lib
    return lib


def _set_signatures(lib: ctypes.CDLL, signatures: dict[str, list]) -> None:
    for function, argtypes in signatures.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = None


def compiler() -> str | None:
    """The C compiler the kernels are built with (``$CC``, ``cc`` or ``gcc``), or None."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.lru_cache(maxsize=4)
def _compiler_version(cc: str) -> str:
    """``cc --version`` (once per process: it is part of every kernel's cache key)."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(name: str) -> Path:
    from mad_search.tasks.cache import cache_dir

    source = (SOURCES / f"{name}.c").read_text()
    headers = "".join(h.read_text() for h in sorted(SOURCES.glob("*.h")))
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc)")
    version = _compiler_version(cc)
    key = hashlib.sha256(
        "\0".join([source, headers, " ".join(FLAGS), version, _cpu_flags()]).encode())
    out = cache_dir() / "native" / f"libmadsearch_{name}_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        done = subprocess.run([cc, *FLAGS, f"-I{SOURCES}", str(SOURCES / f"{name}.c"), "-o",
                               str(tmp_out)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            first_error = next((ln for ln in lines if "error" in ln), lines[0])
            raise RuntimeError(f"building it failed: {first_error.strip()[:200]}")
        os.replace(tmp_out, out)  # atomic: a concurrent worker never loads a half-written file
    return out


def choose(impl: str, name: str, tensors, loader: Callable[[], object],
           unsupported: str | None = None) -> bool:
    """Whether a kernel's ``impl`` argument ("auto", "native" or "torch") picks the C kernel
    ``name`` for ``tensors``: "auto" takes it wherever every tensor is float32 on the CPU and
    ``loader()`` returns the library; "native" insists (RuntimeError saying why not).
    ``unsupported``: why the kernel cannot take these shapes (None: it can); "auto" then takes
    the torch path and "native" raises it."""
    if impl not in ("auto", "native", "torch"):
        raise ValueError(f"impl must be 'auto', 'native' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    if unsupported is not None:
        if impl == "native":
            raise RuntimeError(unsupported)
        return False
    cpu32 = all(t.device.type == "cpu" and t.dtype == torch.float32
                for t in tensors if t is not None)
    if cpu32 and loader() is not None:
        return True
    if impl == "native":
        why = status.get(name, "not loaded") if cpu32 else "the tensors are not float32 on the CPU"
        raise RuntimeError(f"the native {name} kernel cannot run: {why}")
    return False


def int64s(values) -> ctypes.Array:
    """A C array of int64 (e.g. strides), passed where a kernel takes ``const int64_t *``."""
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


def pointer(t: torch.Tensor) -> ctypes.c_void_p:
    """The address of a contiguous CPU tensor's first element."""
    return ctypes.c_void_p(t.data_ptr())


def slots(batch: int) -> int:
    """How many slices :func:`parallel` cuts ``range(batch)`` into: one per torch thread, at
    most ``batch`` (size per-slice workspaces by it)."""
    return max(1, min(torch.get_num_threads(), batch))


def parallel(batch: int, run: Callable[[int, int, int], None]) -> int:
    """Call ``run(slot, b0, b1)`` on contiguous slices of ``range(batch)``, one per torch
    thread (at most ``batch``), concurrently; returns the number of slices."""
    global _pool
    slices = slots(batch)
    bounds = [batch * i // slices for i in range(slices + 1)]
    if slices == 1:
        run(0, 0, batch)
        return 1
    if _pool is None or _pool._max_workers < slices:
        _pool = ThreadPoolExecutor(max_workers=slices, thread_name_prefix="mad-native")
    futures = [_pool.submit(run, i, bounds[i], bounds[i + 1]) for i in range(slices)]
    for f in futures:
        f.result()
    return slices
