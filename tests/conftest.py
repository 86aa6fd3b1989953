import os
import shutil

import pytest

# Tests that validate manifests against ../shared/k8s-schemas may skip on a user's checkout, never in CI.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if shutil.which("nvidia-smi"):
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
