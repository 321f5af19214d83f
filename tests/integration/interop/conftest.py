"""Run ``async def`` tests in this directory on a fresh event loop (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
import inspect

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {n: pyfuncitem.funcargs[n] for n in names}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), timeout=30))
    return True
