"""Reading a user's text file: UTF-8 or one InputError naming the file and the line of the first bad byte."""
import pytest

from actors.common.errors import InputError
from actors.common.files import read_user_lines, read_user_text


def test_undecodable_bytes_name_file_and_line(tmp_path):
    p = tmp_path / "in.txt"
    p.write_bytes("caf\u00e9\r\n".encode() + b"ok\n\n" + b"bad \xe9t\xe9\n")
    with pytest.raises(InputError) as e:
        read_user_lines(p)
    assert (e.value.file, e.value.row) == (str(p), 4)
    assert str(e.value) == f"{p}, row 4: not valid UTF-8 (byte 0xe9)"
    with pytest.raises(InputError) as e:   # a JSON document: its rows are items, so the line goes in the text
        read_user_text(p, rows=False)
    assert e.value.row is None and str(e.value) == f"{p}: not valid UTF-8 at line 4 (byte 0xe9)"


def test_bom_is_dropped_and_rows_are_newline_separated(tmp_path):
    p = tmp_path / "in.jsonl"
    # A byte-order mark (Windows editors) and U+2028 inside a JSON string, which str.splitlines would split on.
    p.write_bytes(b"\xef\xbb\xbf" + '{"a": "x\u2028y"}\r\n{"b": 1}\n'.encode())
    assert read_user_lines(p) == ['{"a": "x\u2028y"}', '{"b": 1}']
    p.write_bytes(b"\xef\xbb\xbfa\n\xff\n")
    with pytest.raises(InputError, match="row 2"):   # counted in the bytes after the mark
        read_user_lines(p)


def test_unreadable_file_says_what_it_is(tmp_path):
    with pytest.raises(InputError, match="cannot read POPE questions file: No such file"):
        read_user_text(tmp_path / "none.jsonl", "POPE questions file")
