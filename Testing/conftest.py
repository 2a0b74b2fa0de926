"""Shared test setup: import paths, the shared data folder, and the bundled models.

Tests that need ../shared/data fail (not skip) when CI=true and the data is missing, so CI can
never pass by silently skipping the real-data tests.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VertebralLabeling"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from VertebralLabelingLib.dataset import data_root  # noqa: E402


def require_path(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise fail in CI and skip elsewhere."""
    if path.exists():
        return path
    message = f"test data missing: {path} (set VERTEBRAL_LABELING_DATA)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str, reason: str = ""):
    """Import ``name``; if it is not installed, fail in CI (the test extras must install it) and
    skip elsewhere, like ``require_path``."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"{name} not installed ({reason or error}); scripts/test.sh installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="session")
def mri_bids() -> Path:
    return require_path(data_root() / "mri" / "bids")


@pytest.fixture(scope="session")
def pam50_dir() -> Path:
    return require_path(data_root() / "mri" / "pam50")


@pytest.fixture(scope="session")
def labeler():
    """The shipped default model, loaded once for the session."""
    from VertebralLabelingLib.labeling import DiscLabeler

    return DiscLabeler.load("compact")
