"""Shared fixtures: one small local Ray per test session, a CPU/CUDA device, and a
headless Chromium (through Playwright) for the tests that open pages in a browser."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# The full traces of the errors that tests provoke go here, not among a user's logs.
os.environ.setdefault("EDICE_LOG_DIR", os.path.join(tempfile.gettempdir(), "edice-test-logs"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray with 2 CPUs (never a running `ray start` cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(request.param)


def find_chromium() -> str | None:
    for name in (os.environ.get("EDICE_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium through Playwright; skipped (or, in CI, failed) without one."""
    required = os.environ.get("EDICE_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "Playwright is not installed (pip install playwright)"
        pytest.fail(why) if required else pytest.skip(why)
    exe = find_chromium()
    if exe is None:
        why = "no Chromium found (apt-get install chromium, or set EDICE_CHROMIUM)"
        pytest.fail(why) if required else pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield b
        b.close()
