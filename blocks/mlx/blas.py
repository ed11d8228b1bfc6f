"""A fast BLAS for MLX on Linux, loaded before MLX itself.

MLX's Linux CPU wheel (``mlx[cpu]``) links a bundled reference BLAS: measured here, one thread,
512 x 512 float32 products, 3-4 GFLOP/s against torch's 60-100. MLX calls only ``cblas_sgemm``
(and ``cblas_dgemm``/``cblas_cgemm``) from it, resolved by name when ``mlx.core`` is loaded, so a
library that defines those symbols and is loaded into the global symbol scope first serves MLX's
matrix products instead.

The ``mlx`` extra therefore installs ``scipy-openblas32`` (OpenBLAS as a wheel, 8 MB) on Linux.
Its symbols carry a ``scipy_`` prefix, so :func:`load` compiles, once, a 10-line shim that defines
``cblas_sgemm``/``cblas_dgemm`` and forwards them to ``scipy_cblas_sgemm``/``scipy_cblas_dgemm``
(the C compiler ``cc`` or ``gcc``; the shim is cached beside the task data) and loads it with
``RTLD_GLOBAL``. Where that is impossible (no compiler, no wheel, not Linux, or ``mlx.core`` was
imported before mad-search could load it) MLX keeps its own BLAS and :func:`load` says why in one
line. On macOS MLX uses Accelerate and the GPU; nothing is done there.

``MAD_SEARCH_MLX_BLAS=bundled`` keeps MLX's own BLAS (for measuring the difference).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = "MAD_SEARCH_MLX_BLAS"

_SHIM = r"""
/* mad-search: MLX's cblas_sgemm/cblas_dgemm served by scipy-openblas32 (prefixed symbols) */
typedef int blasint;
extern void scipy_cblas_sgemm(int, int, int, blasint, blasint, blasint, float, const float *,
                              blasint, const float *, blasint, float, float *, blasint);
extern void scipy_cblas_dgemm(int, int, int, blasint, blasint, blasint, double, const double *,
                              blasint, const double *, blasint, double, double *, blasint);
void cblas_sgemm(int o, int ta, int tb, blasint m, blasint n, blasint k, float al, const float *a,
                 blasint lda, const float *b, blasint ldb, float be, float *c, blasint ldc)
{ scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_dgemm(int o, int ta, int tb, blasint m, blasint n, blasint k, double al,
                 const double *a, blasint lda, const double *b, blasint ldb, double be, double *c,
                 blasint ldc)
{ scipy_cblas_dgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
"""

# What load() did, for reports and benchmarks: "openblas" or "bundled: <reason>"
status: str = "not loaded"
_openblas = None  # the OpenBLAS library handle (thread count)


def load() -> str:
    """Load OpenBLAS for MLX if possible (idempotent); returns :data:`status`."""
    global status, _openblas
    if status != "not loaded":
        return status
    status = _load()
    return status


def _load() -> str:
    global _openblas
    if os.environ.get(ENV, "").strip().lower() == "bundled":
        return f"bundled: {ENV}=bundled"
    if not sys.platform.startswith("linux"):
        return "bundled: not Linux (MLX uses Accelerate)"
    if "mlx.core" in sys.modules:
        return "bundled: mlx.core was imported before mad-search could load OpenBLAS"
    try:
        import scipy_openblas32
    except ImportError:
        return "bundled: scipy-openblas32 is not installed (pip install 'mad-search[mlx]')"
    lib_dir = Path(scipy_openblas32.get_lib_dir())
    lib = lib_dir / f"lib{scipy_openblas32.get_library()}.so"
    try:
        shim = _shim_for(lib)
        _openblas = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except (OSError, RuntimeError) as exc:
        return f"bundled: {exc}"
    set_threads(int(os.environ.get("OPENBLAS_NUM_THREADS", "1") or 1))
    return "openblas"


def set_threads(n: int) -> None:
    """OpenBLAS's thread count (one per worker by default, like the torch workers)."""
    if _openblas is not None:
        _openblas.scipy_openblas_set_num_threads(max(int(n), 1))


def _shim_for(lib: Path) -> Path:
    """The compiled shim for this OpenBLAS library (built once, cached)."""
    from mad_search.tasks.cache import cache_dir

    key = hashlib.sha256((_SHIM + str(lib.resolve())).encode()).hexdigest()[:16]
    out = cache_dir() / "mlx_blas" / f"libmadsearch_cblas_{key}.so"
    if out.exists():
        return out
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) to build the OpenBLAS shim")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, tmp_out = Path(tmp) / "shim.c", Path(tmp) / out.name
        src.write_text(_SHIM)
        cmd = [cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp_out), f"-L{lib.parent}",
               f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the OpenBLAS shim failed: {done.stderr.strip()[:200]}")
        os.replace(tmp_out, out)  # atomic: concurrent workers never load a half-written file
    return out
