"""detokenizer.py on a byte-level tokenizer (one token per UTF-8 byte), against full decodes:
a character split across tokens is never shown half, streaming holds back a possible stop-string
start, the final text is cut at the string the engine reported, and the engine's StopChecker
fires at the first token whose text completes a stop string."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nlcli.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopChecker
from tests.test_scheduler_fakes import write_byte_tokenizer

TEXT = "héllo wörld, 🚀 深度学习 ok"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(write_byte_tokenizer(str(tmp_path_factory.mktemp("bytes"))))


def test_multibyte_characters_are_never_emitted_half(tok):
    ids = list(TEXT.encode())
    assert tok.decode(ids) == TEXT and len(ids) > len(TEXT)  # the oracle, and splits do occur
    detok = IncrementalDetokenizer(tok, list(b"prompt: "))
    for k in range(1, len(ids) + 1):
        text = detok.add(ids[k - 1:k])
        assert REPLACEMENT not in text
        assert TEXT.startswith(text)
        # Everything complete so far is shown: only the bytes of an unfinished character wait.
        assert text == tok.decode(ids[:k]).rstrip(REPLACEMENT)
    assert detok.text == TEXT


def test_final_flushes_an_unfinished_character(tok):
    ids = list("ab🚀".encode())[:-1]  # the rocket's last byte never comes
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:2]) == "ab"
    assert detok.add(ids[2:]) == "ab"
    assert detok.add([], final=True) == tok.decode(ids) != "ab"


def test_streaming_holds_back_a_possible_stop_string_start(tok):
    detok = IncrementalDetokenizer(tok, stop=["Paris", "ZZ"])
    shown = []
    for ch in "capital is Pa":
        detok.add(list(ch.encode()))
        shown.append(detok.visible_text())
    assert detok.text == "capital is Pa"
    assert shown[-1] == "capital is "  # "Pa" may become "Paris"
    assert shown[-2] == "capital is "  # "P" too
    assert shown[-3] == "capital is "  # after "is ": nothing to hold
    detok.add(list(b"x"))  # "Pax" can start no stop string: shown again
    assert detok.visible_text() == "capital is Pax"
    detok.add(list(b" Z"))
    assert detok.visible_text() == "capital is Pax "
    assert IncrementalDetokenizer(tok).add(list(b"Pa")) == "Pa"  # no stop strings: no hold


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_final_text_is_cut_at_the_engine_reported_string(tok, no_stop_trim):
    detok = IncrementalDetokenizer(tok, stop=["Paris"], no_stop_trim=no_stop_trim)
    detok.add(list("It is Paris. Paris again".encode()), final=True)
    full = "It is Paris. Paris again"
    at = full.index("Paris")
    want = full[: at + len("Paris")] if no_stop_trim else full[:at]
    assert detok.final_text("Paris") == want
    other = IncrementalDetokenizer(tok, stop=["Paris"])
    other.add(list(full.encode()), final=True)
    assert other.final_text(None) == full  # a length or EOS finish: nothing cut


@pytest.mark.parametrize("stop", [["is P"], ["zzz", "Par"], ["深度"], ["ö"]])
def test_stop_checker_fires_at_the_completing_token(tok, stop):
    ids = list(TEXT.replace("héllo", "it is Paris").encode())
    sp = SimpleNamespace(skip_special_tokens=True, spaces_between_special_tokens=True, stop=stop)
    checker = StopChecker(tok, [], sp)
    fired = next(k for k in range(1, len(ids) + 1) if checker.add(ids[k - 1]) is not None)
    # The oracle: the first prefix whose full decode contains a stop string.
    first = next(k for k in range(1, len(ids) + 1)
                 if any(s in tok.decode(ids[:k]) for s in stop))
    assert fired == first
    assert checker.add(ids[fired]) == checker.matched  # stays matched
    assert checker.matched in stop and checker.matched in tok.decode(ids[:first])
