import pytest

from tasks.ingest.normalize import DecodeError, decode, normalize_text


def test_utf8_and_bom():
    assert decode("héllo".encode()) == ("héllo", "utf-8")
    assert decode(b"\xef\xbb\xbfhi") == ("hi", "utf-8")


def test_pep263_cookie_is_honoured():
    data = "# -*- coding: latin-1 -*-\nx = 'café'\n".encode("latin-1")
    text, enc = decode(data)
    assert "café" in text and enc == "iso8859-1"


def test_undecodable_is_refused_not_guessed():
    with pytest.raises(DecodeError, match="undecodable"):
        decode("café".encode("latin-1"))
    assert decode("café".encode("latin-1"), ["cp1252"]) == ("café", "cp1252")


def test_binary_and_empty():
    with pytest.raises(DecodeError, match="binary"):
        decode(b"abc\x00def")
    with pytest.raises(DecodeError, match="empty"):
        decode(b"")


def test_normalize_newlines_controls_and_nfc():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("a\x00b\x07c\td\x0ce\x7f\x85") == "abc\tde"
    assert normalize_text("e\u0301") == "\u00e9"
    assert normalize_text("e\u0301", "none") == "e\u0301"
