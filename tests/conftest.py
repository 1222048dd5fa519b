"""Shared fixtures: a model repository of small real ONNX models and a real gateway
(``gateways.GatewayThread``), and the markers applied by folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Ray test clusters start and stop in this process, module after module. A Ray client that
# outlives its cluster ends the whole process 60 s after that cluster's GCS is gone ("Failed
# to connect to GCS within 60 seconds ... The program will terminate", status 1), which
# ended full runs in later, unrelated tests; set before anything imports Ray.
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "86400")

import pytest
from gateways import GatewayThread, local_settings, running
from model_zoo import standard_repository

_FOLDER_MARKERS = {"unit": "unit", "integration": "integration", "e2e": "e2e"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # The first of tests/<folder>/... decides: tests/unit/monitor/x.py is a unit test.
        parts = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts
        if parts and parts[0] in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, _FOLDER_MARKERS[parts[0]]))


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standard_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def local_gateway(repository: Path) -> Iterator[GatewayThread]:
    with running(local_settings(repository)) as server:
        yield server
