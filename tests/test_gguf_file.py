"""gguf_file.GGUFFile against the gguf package's own reader on the embedded SmolLM2 file: the same
tensors (names, shapes, types, dequantized values) and the same scalar and string metadata."""

from __future__ import annotations

import numpy as np
import pytest

from nlcli.engine.model_loader.gguf_file import GGUFFile


def test_index_and_metadata_match_the_gguf_reader():
    import gguf
    from gguf.quants import dequantize

    from nlcli.engine.configs.model_source import resolve_model_source

    path = resolve_model_source(None).weight_files[0]
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(theirs.tensors, ours.tensors):
        assert tuple(int(x) for x in reversed(a.shape)) == b.shape and a.tensor_type == b.qtype
        assert np.array_equal(dequantize(a.data, a.tensor_type).reshape(b.shape),
                              dequantize(b.data, b.qtype).reshape(b.shape)), a.name
    scalars = {k: f.contents() for k, f in theirs.fields.items()  # GGUF.*: the reader's header
               if not k.startswith("GGUF.") and not isinstance(f.contents(), list)}
    assert scalars.keys() == ours.fields.keys()
    for key, value in scalars.items():
        assert ours.field(key) == pytest.approx(value) if isinstance(value, float) else \
            ours.field(key) == value, key
    assert ours.field("general.architecture") == "llama"


def test_not_a_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(bad))
