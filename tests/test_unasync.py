"""scripts/unasync.py: the blocking client is generated from the async one, and is current."""

import importlib.util
import subprocess
import sys
from types import ModuleType

from tests.conftest import ROOT


def _unasync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", ROOT / "scripts" / "unasync.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokens_and_directives() -> None:
    source = "\n".join(
        [
            "import asyncio",
            "class AsyncTallyClient:",
            "    async def iter_x(self) -> AsyncIterator[int]:",
            "        async with self._lock:",
            "            await asyncio.sleep(1)",
            "        async for x in self.stubs.AccountsServiceAsyncStub(grpc.aio.Channel()):",
            "            yield x",
            "    # unasync: async-only",
            "    async def __aenter__(self) -> Self: ...",
            "    # unasync: sync-only",
            "    # def sync_only(self) -> None:",
            "    #",
            "    #     pass",
            "    # unasync: end",
        ]
    )
    lines = _unasync().unasync(source).splitlines()
    assert lines[2:] == [
        "import time",
        "class TallyClient:",
        "    def iter_x(self) -> Iterator[int]:",
        "        with self._lock:",
        "            time.sleep(1)",
        "        for x in self.stubs.AccountsServiceStub(grpc.Channel()):",
        "            yield x",
        "    def sync_only(self) -> None:",
        "",
        "        pass",
    ]


def test_generated_client_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
