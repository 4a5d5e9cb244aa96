"""Hostile input, params files: a duplicate key, a binary or non-UTF-8 file, YAML tags that build Python
objects, a top level that is not a mapping: each is one ConfigError naming the file (and the key)."""
from __future__ import annotations

from pathlib import Path

import pytest

from piggyback.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "params.yaml").read_text()


def _load(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_duplicate_key_is_refused_with_its_line(tmp_path, where):
    if where == "top":
        text = TEXT + "\nbase:\n  seed: 7\n"
    else:
        text = TEXT.replace("  epochs: 3\n", "  epochs: 3\n  epochs: 300\n", 1)
    message = _load(tmp_path, text)
    assert "duplicate key" in message and ("'base'" if where == "top" else "'epochs'") in message


@pytest.mark.parametrize("blob", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + bytes(100), "seed: caf\u00e9".encode("latin-1")])
def test_binary_or_non_utf8_files_are_refused(tmp_path, blob):
    assert "not a UTF-8 text file" in _load(tmp_path, blob)


@pytest.mark.parametrize("text, expect", [
    ("!!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("base: [1, 2\n", "not valid YAML"),
    ("datasets: [a, b]\n", "datasets"),
])
def test_malformed_yaml_is_refused(tmp_path, text, expect):
    assert expect in _load(tmp_path, text)


def test_a_folder_is_not_a_params_file(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path)


def test_the_repo_params_still_load():
    assert load_params(ROOT / "params.yaml").train.epochs == 3
