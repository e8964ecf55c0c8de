"""Every Python code block in README.md and docs/ runs, so the examples cannot rot.

Blocks are Markdown fences tagged ``python`` (README.md, docs/*.md) and reStructuredText
``.. code-block:: python`` directives (docs/*.rst). The blocks of one file run in order
in one namespace, in a temporary folder, as one script would. A block meant not to run
is tagged ``python no-run`` (Markdown) or given the ``:class: no-run`` option (rst);
keep those rare.
"""
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + \
    sorted((ROOT / "docs").glob("*.rst"))
DOC_FILES = [p for p in DOC_FILES if p.exists()]
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.S | re.M)


def markdown_blocks(text):
    """[(line, code, runs)] of the ```python fences in Markdown text."""
    out = []
    for m in FENCE.finditer(text):
        words = m.group("info").split()
        if not words or words[0] != "python":
            continue
        line = text.count("\n", 0, m.start()) + 2
        body = textwrap.dedent(m.group("body"))
        out.append((line, body, "no-run" not in words[1:]))
    return out


def rst_blocks(text):
    """[(line, code, runs)] of the ``.. code-block:: python`` directives in rst text."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. (code-block|code|sourcecode):: *(\S*)\s*$", lines[i])
        if not m or m.group(3) not in ("python", "python3", "py"):
            i += 1
            continue
        indent = len(m.group(1))
        i += 1
        runs = True
        while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # options
            if re.match(r"^\s+:class:.*\bno-run\b", lines[i]):
                runs = False
            i += 1
        start = i
        body = []
        while i < len(lines) and (lines[i].strip() == "" or
                                  len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        out.append((start + 1, textwrap.dedent("\n".join(body)).strip("\n") + "\n", runs))
    return out


def blocks(path):
    text = path.read_text(encoding="utf-8")
    return rst_blocks(text) if path.suffix == ".rst" else markdown_blocks(text)


def test_the_extractors_find_blocks_and_no_run_tags():
    md = "a\n```python\nx = 1\n```\n```python no-run\nboom()\n```\n```bash\nls\n```\n" \
         "  ```python\n  y = 2\n  ```\n"
    assert markdown_blocks(md) == [(3, "x = 1\n", True), (6, "boom()\n", False),
                                   (12, "y = 2\n", True)]
    rst = ("Text\n\n.. code-block:: python\n\n   a = 1\n\n   b = a\n\nmore\n\n"
           ".. code-block:: python\n   :class: no-run\n\n   boom()\n\n"
           ".. code-block:: text\n\n   nope\n")
    got = rst_blocks(rst)
    assert [(code, runs) for _, code, runs in got] == [("a = 1\n\nb = a\n", True),
                                                       ("boom()\n", False)]


def test_docs_have_code_blocks():
    """The harness really sees the examples (a broken extractor would pass everything)."""
    counts = {p.name: sum(1 for b in blocks(p) if b[2]) for p in DOC_FILES}
    assert counts.get("README.md", 0) >= 2
    assert counts.get("tutorial.rst", 0) >= 10


def _needs(code):
    mods = []
    if "load_digits" in code:
        mods.append("sklearn")
    if re.search(r"^\s*import torch|^\s*from torch", code, re.M):
        mods.append("torch")
    return mods


WITH_CODE = [p for p in DOC_FILES if any(b[2] for b in blocks(p))]


@pytest.mark.parametrize("path", WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in WITH_CODE])
def test_code_blocks_run(path, tmp_path, monkeypatch):
    runnable = [b for b in blocks(path) if b[2]]
    for line, code, _ in runnable:
        for mod in _needs(code):
            pytest.importorskip(mod)
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ns = {"__name__": "__docs__"}
    for line, code, _ in runnable:
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"{path.name}, the block at line {line} failed: "
                                 f"{type(exc).__name__}: {exc}\n{code}") from exc
