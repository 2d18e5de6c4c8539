"""Fixtures of the compression tests (the cases live in tests/_cases.py)."""

import pytest
from _cases import CASES, Case


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module")
def vit_case() -> Case:
    return Case("vit")
