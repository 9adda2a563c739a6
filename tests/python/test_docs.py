"""Runs the Python snippets of docs/integrations.md."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def snippet(name):
    text = DOC.read_text()
    match = re.search(r"<!-- snippet:" + name + r"[^\n]*\n```python\n(.*?)\n```", text, re.S)
    assert match, f"snippet {name} not found in {DOC}"
    return match.group(1)


def test_jax_snippet_runs(capsys):
    exec(compile(snippet("jax"), str(DOC), "exec"), {})
    out = capsys.readouterr().out.split()
    loss, kl = float(out[0]), float(out[1])
    assert 0.0 < loss < 1.33 and kl >= 0.0
    assert out[2] == "bfloat16"


def test_torch_snippet_runs(capsys):
    import pytest

    pytest.importorskip("kto_torch")
    exec(compile(snippet("torch"), str(DOC), "exec"), {})
    out = capsys.readouterr().out.split()
    loss, kl = float(out[0]), float(out[1])
    assert 0.0 < loss < 1.33 and kl >= 0.0
    assert out[2] == "torch.bfloat16"
