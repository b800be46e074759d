"""Decoding a reply: every entry ends up in the batch, rejected with its reason, or noted as
vanished; columns line up with the entries whatever their field order."""

from __future__ import annotations

from flowd.core.columns import ABSENT
from flowd.plugin.decode import decode


def test_entries_of_several_shapes_line_up_in_columns_with_absent_fields_marked() -> None:
    entries = [("1-1", [b"a", b"1", b"b", b"x"]), ("1-2", [b"a", b"2", b"b", b"y"]),
               ("1-3", [b"b", b"z", b"c", b"!"]), ("1-4", [b"a", b"4", b"a", b"last"])]
    columns = decode(entries, 1 << 20).columns()
    assert columns.ids == ["1-1", "1-2", "1-3", "1-4"]
    assert columns.data == {"a": [b"1", b"2", ABSENT, b"last"], "b": [b"x", b"y", b"z", ABSENT],
                            "c": [ABSENT, ABSENT, b"!", ABSENT]}
    # messages see the same entries as text; a repeated field keeps its last value
    assert [m.fields for m in decode(entries, 1 << 20).messages()][3] == {"a": "last"}


def test_bad_entries_are_set_aside_with_their_reason_and_the_rest_decode() -> None:
    entries = [("1-1", [b"a", b"ok"]), ("1-2", [b"a", b"\xff\xfe"]), ("1-3", None),
               ("1-4", [b"a", b"x" * 100]), ("1-5", [b"a", "é".encode()]),
               ("1-6", [b"a", "é".encode()[:1]]), ("1-7", ["é".encode()[1:], b"v"])]
    decoded = decode(entries, 50)
    assert [entry_id for entry_id, _ in decoded.live] == ["1-1", "1-5"]
    assert decoded.vanished == ["1-3"]
    assert decoded.rejected["1-4"] == "entry is 101 bytes, over max_entry_bytes (50)"
    assert decoded.rejected["1-2"] == ('field "a" is not valid UTF-8: byte 0xff at offset 0 '
                                       "(invalid start byte) of its 2-byte value")
    assert decoded.rejected["1-6"] == ('field "a" is not valid UTF-8: byte 0xc3 at offset 0 '
                                       "(unexpected end of data) of its 1-byte value")
    assert decoded.rejected["1-7"] == ('the name of field 1 ("\\xa9") is not valid UTF-8: '
                                       "byte 0xa9 at offset 0 (invalid start byte)")
    # a sequence cut at one value's end is not completed by the next one's start
    assert set(decoded.rejected) == {"1-2", "1-4", "1-6", "1-7"}
