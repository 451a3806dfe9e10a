"""Every test in this directory runs on uvloop (``relay serve``'s loop); the rest of the suite on asyncio's."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import uvloop
from pytest_asyncio.plugin import LoopFactory


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    return {"uvloop": uvloop.new_event_loop}
