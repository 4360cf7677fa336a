"""``fedtune predict``'s input readers (the model side runs in
tests/integration/test_after_run.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fedtune.common.errors import DataError
from fedtune.server.tools.predict import read_inputs


def test_text_lines_jsonl_and_stdin(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "a.txt").write_text("first record\n\n second one \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"review": "x", "id": 7}) + "\n")
    stdin_json = io.StringIO(json.dumps({"review": "from a pipe"}) + "\n")
    stdin_text = io.StringIO("plain line\n")
    # Execute
    lines = read_inputs(str(tmp_path / "a.txt"), column="review")
    rows = read_inputs(str(tmp_path / "b.jsonl"), column="review")
    piped = read_inputs("-", column="review", stdin=stdin_json)
    plain = read_inputs("-", column="review", stdin=stdin_text)
    # Assert
    assert lines == [{"review": "first record"}, {"review": " second one "}]
    assert rows == [{"review": "x", "id": 7}]
    assert piped == [{"review": "from a pipe"}]
    assert plain == [{"review": "plain line"}]


@pytest.mark.parametrize(("source", "stdin", "match"), [
    ("missing.txt", "", r"missing.txt: input file not found"),
    ("-", "\n\n", r"-: no records; the input is empty"),
    ("-", '{"body": "x"}\n', r"stdin: record 1 has no 'review'; found \['body'\]"),
    ("-", '{"review": "x"}\nnot json\n', r"stdin:2: not valid JSON"),
    ("wrong.jsonl", "", r"missing column\(s\) \['review'\]; found \['body'\]"),
])
def test_bad_input_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   source: str, stdin: str, match: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=match):
        read_inputs(source, column="review", stdin=io.StringIO(stdin))
