"""Generates the blocking client from the async one (the client is written once).

    python scripts/unasync.py           writes clients/tally_client/_sync_client.py
    python scripts/unasync.py --check   exits 1 if that file is not what it would write

The async source (``clients/tally_client/_async_client.py``) is turned into blocking code by
whole-word token substitutions (``async def`` -> ``def``, ``await x`` -> ``x``,
``AsyncIterator`` -> ``Iterator``, ``grpc.aio`` -> ``grpc``, ``asyncio.sleep`` ->
``time.sleep``, ...) and two line directives:

    # unasync: async-only      the lines up to the next directive are left out
    # unasync: sync-only       the lines up to ``# unasync: end`` are commented out in the
                               async source ("# " after the indentation); uncommented here
    # unasync: end

Imports made redundant by the substitutions are dropped and sorted again, and the result is
formatted, with the project's ruff (so ``ruff format --check`` and ``ruff check`` pass on it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "clients" / "tally_client" / "_async_client.py"
TARGET = ROOT / "clients" / "tally_client" / "_sync_client.py"

# (pattern, replacement), applied in order to every line of code (not to directives).
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\b__aiter__\b", "__iter__"),
    (r"\b__anext__\b", "__next__"),
    (r"\bStopAsyncIteration\b", "StopIteration"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncIterable\b", "Iterable"),
    (r"\bAsyncGenerator\b", "Generator"),
    (r"\bAsyncTallyClient\b", "TallyClient"),
    (r"\bAsyncStubs\b", "Stubs"),
    (r"\b(\w+)AsyncStub\b", r"\1Stub"),
    (r"\b_Async(\w+)", r"_\1"),
    (r"\bgrpc\.aio\.", "grpc."),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"^import asyncio$", "import time"),
]

HEADER = """\
# Generated from _async_client.py by scripts/unasync.py: do not edit.
# mypy: disable-error-code="redundant-cast"
"""

DIRECTIVE = re.compile(r"^\s*# unasync: (async-only|sync-only|end)\s*$")


def unasync(source: str) -> str:
    out: list[str] = []
    mode = "both"
    for number, line in enumerate(source.splitlines(), 1):
        directive = DIRECTIVE.match(line)
        if directive:
            word = directive.group(1)
            if word == "end":
                mode = "both"
            elif word == "sync-only" and mode not in ("both", "async-only"):
                raise SystemExit(f"{SOURCE.name}:{number}: sync-only inside sync-only")
            else:
                mode = word
            continue
        if mode == "async-only":
            continue
        if mode == "sync-only":
            stripped = line.lstrip()
            indent = line[: len(line) - len(stripped)]
            if stripped == "#":
                line = ""
            elif stripped.startswith("# "):
                line = indent + stripped[2:]
            else:
                raise SystemExit(f"{SOURCE.name}:{number}: a sync-only line must start with '# '")
        for pattern, replacement in SUBSTITUTIONS:
            line = re.sub(pattern, replacement, line)
        out.append(line)
    if mode != "both":
        raise SystemExit(f"{SOURCE.name}: missing '# unasync: end'")
    return HEADER + "\n".join(out) + "\n"


def _ruff(*args: str, code: str) -> str:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        raise SystemExit("unasync: ruff is needed (scripts/bootstrap installs it)")
    name = str(TARGET.relative_to(ROOT))
    result = subprocess.run(
        [ruff, *args, "--stdin-filename", name, "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"unasync: ruff {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def generate() -> str:
    code = unasync(SOURCE.read_text(encoding="utf-8"))
    # Unused and duplicated imports (AsyncIterable and Iterable both become Iterable), order.
    code = _ruff("check", "--fix", "--exit-zero", "--quiet", "--select", "F401,F811,I", code=code)
    return _ruff("format", code=code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args()
    wanted = generate()
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if args.check:
        if current != wanted:
            print(
                f"{TARGET.relative_to(ROOT)} is stale: run python scripts/unasync.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if current != wanted:
        TARGET.write_text(wanted, encoding="utf-8")
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
