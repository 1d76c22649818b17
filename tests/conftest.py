"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> tuple[str, str]:
    """The full demo dataset, built once per test session: (data_path, tokenizer_path)."""
    from lcq.corpus import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))
