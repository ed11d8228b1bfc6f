import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # the MLX twins first, so their fast BLAS is loaded before MLX (blocks.mlx.blas)
    import blocks.mlx  # noqa: E402, F401
except ImportError:  # no mlx extra: the MLX tests skip themselves
    pass


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2-core CI machines: keep torch from oversubscribing them.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "task-cache"))
    yield
