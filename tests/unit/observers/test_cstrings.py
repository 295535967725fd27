from __future__ import annotations

from tapio.observers.base import CStrings


def test_decodes_up_to_the_first_nul_and_marks_invalid_utf8() -> None:
    c = CStrings()
    assert c.decode(b"curl\0\0\0garbage\0") == "curl"
    assert c.decode(b"\xff\xfe\0") == "<invalid>"
    assert c.decode(b"exactly16bytes!!") == "exactly16bytes!!"


def test_memo_is_bounded() -> None:
    c = CStrings(maxsize=8)
    for i in range(100):
        assert c.decode(f"p{i}\0".encode()) == f"p{i}"
        assert len(c.cache) <= 8
