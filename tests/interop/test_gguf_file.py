"""The GGUF v3 container written by hand (`gguf_file.write_gguf`), read by llama.cpp's own `gguf` package:
every metadata type, tensors of each ggml type at aligned offsets, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

from hybridlm.interop.gguf_file import (ARRAY, FLOAT64, GGML_BF16, GGML_F16, GGML_F32, INT8, UINT64, TensorEntry,
                                        Value, f32, i32s, strs, u32, write_gguf)

gguf = pytest.importorskip("gguf")


def test_metadata_of_every_kind_reads_back(tmp_path):
    meta = {"a.u32": u32(7), "a.f32": f32(0.5), "a.bool": True, "a.str": "naïve ✓",
            "a.i32s": i32s([0, -3, 2**31 - 1]),
            "a.strs": strs(["x", "", "日本"]), "a.u64": Value(UINT64, 2**40), "a.f64": Value(FLOAT64, 1e-300),
            "a.i8s": Value(ARRAY, [-1, 2], INT8)}
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", meta, [])))
    got = {k: f.contents() for k, f in reader.fields.items() if k.startswith("a.")}
    assert got == {"a.u32": 7, "a.f32": 0.5, "a.bool": True, "a.str": "naïve ✓", "a.i32s": [0, -3, 2**31 - 1],
                   "a.strs": ["x", "", "日本"], "a.u64": 2**40, "a.f64": 1e-300, "a.i8s": [-1, 2]}
    assert reader.fields["a.i32s"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert (reader.fields["GGUF.version"].contents(), reader.fields["GGUF.kv_count"].contents()) == (3, len(meta))


def test_tensors_of_each_type_come_back_at_aligned_offsets(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (7,), (2, 3, 4)))
    entries = [TensorEntry("a", a.shape, GGML_F32, lambda: a),
               TensorEntry("b", b.shape, GGML_F16, lambda: b.astype(np.float16)),
               TensorEntry("c", c.shape, GGML_BF16, lambda: gguf.quants.quantize(c, gguf.GGMLQuantizationType.BF16))]
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", {}, entries)))
    got = {t.name: t for t in reader.tensors}
    assert [got[n].shape.tolist() for n in "abc"] == [[5, 3], [7], [4, 3, 2]]  # ggml order: fastest first
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    assert np.array_equal(got["a"].data, a)
    assert np.array_equal(got["b"].data, b.astype(np.float16))
    bf16 = gguf.quants.dequantize(got["c"].data, got["c"].tensor_type).reshape(c.shape)
    assert np.array_equal(bf16, gguf.quants.dequantize(gguf.quants.quantize(c, gguf.GGMLQuantizationType.BF16),
                                                       gguf.GGMLQuantizationType.BF16))


def test_errors_name_the_problem_and_leave_no_file(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(TypeError, match="needs an explicit type"):
        write_gguf(out, {"n": 3}, [])
    one = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="duplicate GGUF tensor names: \\['t'\\]"):
        write_gguf(out, {}, [TensorEntry("t", (4,), GGML_F32, lambda: one)] * 2)
    with pytest.raises(ValueError, match="GGUF tensor 'x': 16 bytes of data for shape \\(8,\\)"):
        write_gguf(out, {}, [TensorEntry("x", (8,), GGML_F32, lambda: one)])
    assert not out.exists() and not list(tmp_path.iterdir())
