import pytest

from pensieve_bridge.engine import Engine


@pytest.fixture(scope="session")
def engine():
    return Engine("demo")
