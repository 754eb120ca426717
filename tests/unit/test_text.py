"""TextAssembler: whole UTF-8 characters only, stop strings across token boundaries."""

import pytest

from fusion_server.text import TextAssembler


def _bytewise(asm: TextAssembler, data: bytes) -> list[str]:
    return [asm.push(data[i : i + 1]) for i in range(len(data))]


@pytest.mark.parametrize("text", ["é", "世界", "🙂", "héllo 世界 🙂!", "a🙂b世c"])
def test_multibyte_split_into_single_bytes(text):
    asm = TextAssembler()
    deltas = _bytewise(asm, text.encode())
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == text and asm.text == text
    assert asm.finish() == ""


def test_incomplete_char_is_held_until_complete():
    asm = TextAssembler()
    emoji = "🙂".encode()
    assert asm.push(b"ok " + emoji[:2]) == "ok "
    assert asm.push(emoji[2:3]) == ""
    assert asm.push(emoji[3:] + b"!") == "🙂!"


def test_finish_flushes_incomplete_tail_as_replacement():
    asm = TextAssembler()
    assert asm.push(b"x" + "世".encode()[:2]) == "x"
    assert asm.finish() == "\ufffd"
    assert asm.text == "x\ufffd"


def test_invalid_bytes_are_not_held():
    asm = TextAssembler()
    assert asm.push(b"a\xffb") == "a\ufffdb"
    assert asm.push("é".encode()[:1] + b"z") == "\ufffdz"


def test_stop_inside_one_push():
    asm = TextAssembler(stop=["STOP"])
    assert asm.push(b"hello STOP world") == "hello "
    assert asm.stopped and asm.text == "hello "
    assert asm.push(b"more") == ""
    assert asm.finish() == ""


def test_stop_across_token_boundaries():
    asm = TextAssembler(stop=["</end>"])
    deltas = [asm.push(piece) for piece in (b"abc<", b"/e", b"n", b"d>tail")]
    assert deltas == ["abc", "", "", ""]
    assert asm.stopped and asm.text == "abc"


def test_held_prefix_released_when_it_cannot_match():
    asm = TextAssembler(stop=["</end>"])
    assert asm.push(b"a</e") == "a"
    assert asm.push(b"x") == "</ex"
    assert not asm.stopped


def test_held_prefix_flushed_by_finish():
    asm = TextAssembler(stop=["\n\n"])
    assert asm.push(b"line\n") == "line"
    assert asm.finish() == "\n"
    assert asm.text == "line\n" and not asm.stopped


def test_earliest_of_several_stops_wins():
    asm = TextAssembler(stop=["world", "lo w"])
    assert asm.push(b"hel") == "he"  # "l" may start "lo w"
    assert asm.push(b"lo world") == "l"
    assert asm.text == "hel" and asm.stopped


def test_multibyte_stop_split_bytewise():
    asm = TextAssembler(stop=["世界"])
    deltas = _bytewise(asm, "héllo 世界 after".encode())
    assert "".join(deltas) == "héllo " and asm.stopped
    assert "\ufffd" not in asm.text


def test_nothing_after_stop_is_ever_emitted():
    stop = "<|x|>"
    text = "aaa<|<|x<|x|>bbb<|x|>"
    for split in range(1, len(text)):
        asm = TextAssembler(stop=[stop])
        out = asm.push(text[:split].encode()) + asm.push(text[split:].encode()) + asm.finish()
        assert out == "aaa<|<|x" and asm.stopped


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="stop"):
        TextAssembler(stop=[""])


def test_push_after_finish_raises():
    asm = TextAssembler()
    asm.finish()
    with pytest.raises(RuntimeError):
        asm.push(b"x")
