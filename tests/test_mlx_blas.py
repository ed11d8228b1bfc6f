"""MLX's matrix products on Linux go through OpenBLAS (blocks.mlx.blas), and stay correct."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("blocks.mlx")
import mlx.core as mx  # noqa: E402

from blocks.mlx import blas  # noqa: E402


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS shim is Linux-only")
def test_openblas_is_loaded_on_linux():
    pytest.importorskip("scipy_openblas32")
    assert blas.status == "openblas"


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matrix_products_are_right_through_the_shim(ta, tb):
    rng = np.random.default_rng()
    m, k, n = (int(v) for v in rng.integers(1, 70, 3))
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    am, bm = mx.array(a), mx.array(b)
    got = (am.T if ta else am) @ (bm.T if tb else bm)
    want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    batched = mx.array(rng.standard_normal((3, m, k)).astype(np.float32))
    np.testing.assert_allclose(np.array(batched @ mx.array(b if not tb else b.T)),
                               np.array(batched) @ (b if not tb else b.T), rtol=1e-4, atol=1e-3)


def test_bundled_blas_can_be_chosen_and_says_why():
    code = "import blocks.mlx; from blocks.mlx import blas; print(blas.status)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, blas.ENV: "bundled"})
    assert out.stdout.strip() == f"bundled: {blas.ENV}=bundled"


def test_mlx_imported_first_keeps_its_blas_and_says_so():
    code = "import mlx.core; import blocks.mlx; from blocks.mlx import blas; print(blas.status)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "imported before" in out.stdout
