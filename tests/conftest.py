"""Test setup. Triton's interpreter must be chosen before anything imports triton, so the
variable is set here, at the top of the first file pytest loads. A GPU run can override it with
TRITON_INTERPRET=0."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never read or write the user's tuning cache.
if "TRUTHFUSE_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TRUTHFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="truthfuse-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TRUTHFUSE_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_reset():
    """Fresh random inputs per test, and no compiled state leaking between tests. Fallback
    warnings are once per reason; each test starts with none reported, so its own show."""
    from fusion_backend.ops.fallback import reset_fallback_warnings

    torch.seed()
    reset_fallback_warnings()
    yield
    torch._dynamo.reset()


@pytest.fixture
def inner_graphs(monkeypatch):
    """The graphs the backend hands to its inner compiler."""
    import importlib

    # the module, not the `fusion_backend.backend(...)` function the package exports under that name
    backend_module = importlib.import_module("fusion_backend.backend")
    seen = []
    original = backend_module._inner_compile

    def spy(gm, example_inputs, options):
        seen.append(gm)
        return original(gm, example_inputs, options)

    monkeypatch.setattr(backend_module, "_inner_compile", spy)
    return seen
