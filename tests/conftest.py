"""Shared fixtures."""
from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> tuple[str, str]:
    """The full demo dataset, built once per test session: (data_path, tokenizer_path)."""
    from lcq.tools.corpus import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a gloo group's rendezvous (tcp:// init)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
