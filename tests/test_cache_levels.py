"""Storage levels of the teacher cache (issue #22 B): each level's round trip against a hand computation,
the selective-transfer mask from a compact cache, the level in the binding, format-3 caches, the dry
run's sizes against the bytes written, the bad inputs, and the bench's JSON."""

import argparse
import json
import re

import numpy as np
import pytest
import torch

from sskd.cache import (
    VERSION,
    CacheReader,
    check_usable,
    chunk_path,
    dense_from_topk,
    map_chunk,
    write_chunk,
)
from sskd.cache.build import build_cache
from sskd.cache.levels import (
    IMAGENET,
    Storage,
    bytes_per_image,
    check_request,
    code_basis,
    code_levels,
    decode,
    default,
    encode,
    fit_code,
    fit_projection,
    for_budget,
    imagenet_outputs,
    index_bytes,
    level_name,
    level_storage,
    requested,
)
from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.engine.config import load_config
from sskd.engine.prepare import prepare

FAST = ["--no-progress", "--batch-size", "32", "--set", "data.eval_batch_size=128"]
SSKD_OUTPUTS = [  # SSKD on the digits: 10 classes, the resnet8 SS head's 64-dim embeddings
    {"name": "logits", "shape": [10], "topk": True, "cosine": False},
    {"name": "embed", "shape": [64], "topk": False, "cosine": True},
]


def run(*args):
    return sskd_main([str(a) for a in args])


# ---- round trips against hand computations -------------------------------------------------------------


def test_int8_rows_are_unit_rows_with_a_per_row_scale():
    x = np.array([[[3.0, -4.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]], np.float32)  # (n=2, V=1, d=4)
    a = encode("embed", x, Storage("int8"))
    # unit row (0.6, -0.8, 0, 0): peak 0.8, scale 0.8 / 127 in fp16, codes round(row / scale)
    scale = np.float16(0.8 / 127)
    assert a["embed.scale"].dtype == np.float16 and a["embed.scale"][0, 0] == scale
    want = np.rint(np.array([0.6, -0.8, 0, 0]) / np.float32(scale)).astype(np.int8)
    assert a["embed.q"].dtype == np.int8 and (a["embed.q"][0, 0] == want).all() and want[1] == -127
    assert (a["embed.q"][1] == 0).all()  # a zero row stays zero (no division by zero)
    back = decode(a, "embed", Storage("int8"), 4)
    assert np.allclose(back[0, 0], [0.6, -0.8, 0, 0], atol=0.8 / 127)
    assert Storage("int8").row_bytes(4) == 4 + 2


def test_projection_keeps_the_cosines_of_rows_in_its_subspace():
    g = np.random.default_rng(0)
    plane = np.linalg.qr(g.normal(size=(6, 2)))[0]  # an orthonormal basis of a plane in 6 dims
    rows = g.normal(size=(40, 2)) @ plane.T * g.uniform(0.5, 3, size=(40, 1))
    proj = fit_projection(rows, 2)
    basis = proj["basis"]
    assert basis.shape == (6, 2) and np.allclose(basis.T @ basis, np.eye(2), atol=1e-5)
    assert np.allclose(basis @ basis.T, plane @ plane.T, atol=1e-5)  # it found the plane
    x = rows.reshape(40, 1, 6).astype(np.float32)
    for kind in ("fp16", "int8"):
        s = Storage(kind, dim=2)
        a = encode("embed", x, s, proj)
        stored = a["embed"] if kind == "fp16" else a["embed.q"]
        assert stored.shape == (40, 1, 2)
        back = decode(a, "embed", s, 6, proj=proj)[:, 0]
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        cos = (back / np.linalg.norm(back, axis=1, keepdims=True)) @ unit.T
        assert np.abs(cos - unit @ unit.T).max() < (1e-3 if kind == "fp16" else 2e-2), kind
    unit_codes = (rows / np.linalg.norm(rows, axis=1, keepdims=True)) @ basis
    unit_codes /= np.linalg.norm(unit_codes, axis=1, keepdims=True)
    assert np.allclose(proj["mean"], unit_codes.mean(0), atol=1e-5)  # subtracted before int8 coding
    assert Storage("int8", dim=2).row_bytes(6) == 2 + 2 and Storage("fp16", dim=2).row_bytes(6) == 4


def test_topk_indices_are_int16_up_to_32767_classes():
    assert index_bytes(32767) == 2 and index_bytes(32768) == 4
    small = encode(
        "logits", np.random.default_rng(0).normal(size=(2, 3, 50)).astype(np.float32), Storage("topk", k=5)
    )
    assert small["logits.topi"].dtype == np.int16 and small["logits.topv"].dtype == np.float16
    big = encode("logits", np.zeros((1, 1, 40000), np.float32), Storage("topk", k=5))
    assert big["logits.topi"].dtype == np.int32
    assert (
        Storage("topk", k=5).row_bytes(50) == 5 * (2 + 2) + 4
        and Storage("topk", k=5).row_bytes(40000) == 5 * 6 + 4
    )


def test_topk_keeps_the_mass_outside_the_top_k_exact():
    logits = np.array([[[2.0, 1.0, 0.0, -1.0]]], np.float32)
    a = encode("logits", logits, Storage("topk", k=2))
    assert a["logits.lse"][0, 0] == pytest.approx(np.log(np.exp(logits).sum()), abs=1e-6)
    dense = decode(a, "logits", Storage("topk", k=2), 4)[0, 0]
    p, q = np.exp(logits[0, 0]) / np.exp(logits).sum(), np.exp(dense) / np.exp(dense).sum()
    assert q[:2] == pytest.approx(p[:2], abs=1e-3)  # fp16 top values
    # the two other classes share their exact total mass evenly
    assert q[2] == pytest.approx(q[3]) and q[2] + q[3] == pytest.approx(p[2] + p[3], abs=1e-3)


def test_topk_keeps_the_tail_exact_at_the_temperature_it_was_stored_for():
    logits = np.array([[[6.0, 4.0, 1.0, 0.5, -2.0, -3.0]]], np.float32)
    t = 4.0
    s = Storage("topk", k=2, t=t)
    a = encode("logits", logits, s)
    # lse = t * log(sum(exp(x / t))), by hand
    assert a["logits.lse"][0, 0] == pytest.approx(t * np.log(np.exp(logits / t).sum()), abs=1e-5)
    dense = decode(a, "logits", s, 6)[0, 0]

    def soft(x, temp):
        e = np.exp(x / temp)
        return e / e.sum()

    p, q = soft(logits[0, 0].astype(np.float64), t), soft(dense.astype(np.float64), t)
    assert q[:2] == pytest.approx(p[:2], abs=1e-3)  # the top 2 at T = 4: as exact as fp16 values
    assert q[2:] == pytest.approx(np.full(4, p[2:].sum() / 4), abs=1e-4)  # the tail's exact mass, evenly
    # The T = 1 tail filled in evenly holds too much at T = 4: what a T = 1 cache got wrong at the KD's T.
    q1 = soft(
        decode(encode("logits", logits, Storage("topk", k=2)), "logits", Storage("topk", k=2), 6)[0, 0], t
    )
    assert q1[2:].sum() > p[2:].sum() + 0.03  # 0.365 against 0.327
    # decode passes the storage's temperature on
    assert dense_from_topk(a["logits.topv"], a["logits.topi"], a["logits.lse"], 6, t)[0, 0] == pytest.approx(
        dense
    )


def test_a_top_k_over_a_code_keeps_the_top_k_and_codes_the_rest_by_hand():
    g = np.random.default_rng(1)
    w = 30  # rows in a plane of a 30-class space, around a centre off the origin
    plane = np.linalg.qr(g.normal(size=(w, 2)))[0]
    rows = (g.normal(size=w) * 2 + (g.normal(size=(50, 2)) * 3) @ plane.T).astype(np.float32)
    code = fit_code(rows, 2)
    basis, center = code_basis(code), code["center"]
    assert code["levels"].dtype == np.int16 and np.abs(code["levels"]).max() == code_levels(2) == 32767
    assert basis.shape == (w, 2) and np.allclose(basis.T @ basis, np.eye(2), atol=1e-4)
    assert np.allclose(basis @ basis.T, plane @ plane.T, atol=1e-4)  # the centred PCA found the plane
    assert np.allclose(center, rows.mean(0), atol=1e-5)
    # each class's basis row as integer levels times a step: codes x levels sum exactly in float32
    assert code_levels(128) == 1032 and 127 * 1032 * 128 < 2**24 <= 127 * 1033 * 128
    s = Storage("topk", k=3, dim=2)
    z = rows.reshape(25, 2, w)  # (n, V, classes)
    a = encode("logits", z, s, code)
    assert set(a) == {"logits.topv", "logits.topi", "logits.q", "logits.scale"}  # no lse: no temperature
    # by hand: the centred row's coordinates, int8 codes with a per-row fp16 step (the largest / 127)
    coords = (z - center) @ basis
    step = (np.abs(coords).max(-1) / 127).astype(np.float16)
    q = np.clip(np.rint(coords / step.astype(np.float32)[..., None]), -127, 127)
    assert np.array_equal(a["logits.scale"], step) and np.array_equal(a["logits.q"], q.astype(np.int8))
    top = np.argsort(-z, -1)[..., :3]
    topv = np.take_along_axis(z, top, -1).astype(np.float16)
    assert np.array_equal(a["logits.topi"], top) and np.array_equal(a["logits.topv"], topv)
    # read: the code's row, every class outside the top 3 held at or below the 3rd value, the top 3 over it
    want = center + (q * step.astype(np.float32)[..., None]) @ basis.T.astype(np.float64)
    want = np.minimum(want, topv[..., -1:].astype(np.float32))
    np.put_along_axis(want, top, topv.astype(np.float32), -1)
    back = decode(a, "logits", s, w, proj=code)
    assert back.shape == z.shape and np.allclose(back, want, atol=1e-5)
    assert np.abs(back - z).max() < 0.05 and np.array_equal(back.argmax(-1), z.argmax(-1))
    # K x (2 + 2) + D + 2 bytes a row; the name and the manifest's form
    assert s.row_bytes(w) == 3 * 4 + 2 + 2 and s.name == "top3-d2" and Storage.parse("top3-d2") == s
    assert Storage.from_json(s.to_json()) == s
    with pytest.raises(
        SSKDError, match=r"its basis is fitted on 2 class-score rows, no more than its 2 dims"
    ):
        fit_code(rows[:2], 2)


def test_a_top_k_over_a_code_has_no_temperature_and_serves_any():
    from sskd.cache.levels import at_temperatures
    from sskd.methods.sskd import SSKD

    storage = {"logits": Storage("topk", k=10, dim=32)}
    assert at_temperatures(storage, {"logits": (2.0, 4.0)}, "sskd") == storage  # two temperatures: fine
    m = {
        "outputs": [{"name": "logits", "shape": [100], "topk": True, "storage": storage["logits"].to_json()}]
    }
    check_usable(m, SSKD, {}, "c", {"logits": (2.0, 4.0)})


def test_a_fitted_basis_is_scored_in_what_the_methods_read_on_rows_it_was_not_fitted_on():
    from sskd.cache.levels import held_out_error

    g = np.random.default_rng(2)
    w = 200  # class scores in a 4-dimensional affine subspace (a low-rank teacher), and full-rank ones
    low = (
        g.normal(size=w) + (g.normal(size=(500, 4)) * 3) @ np.linalg.qr(g.normal(size=(w, 4)))[0].T
    ).astype(np.float32)
    full = (g.normal(size=(500, w)) * 3).astype(np.float32)
    s = Storage("topk", k=5, dim=8)
    for rows, most, least in ((low, 0.005, 0.0), (full, 1.0, 0.05)):
        code = fit_code(rows[:400], 8)
        err = held_out_error(rows[400:], s, code, (1.0, 4.0))
        # by hand: the mean total variation between the softmaxes of the rows and of the rows read back,
        # the worse of the two temperatures
        back = torch.from_numpy(decode(encode("x", rows[400:], s, code), "x", s, w, proj=code)).double()
        x = torch.from_numpy(rows[400:]).double()
        tv = [
            0.5 * ((x / t).softmax(-1) - (back / t).softmax(-1)).abs().sum(-1).mean().item() for t in (1, 4)
        ]
        assert err == pytest.approx(max(tv), rel=1e-9, abs=1e-12) and least <= err <= most, err
    # embeddings: the largest error of an entry of the rows' cosine-similarity matrix
    low = (g.normal(size=(300, 6)) @ g.normal(size=(6, 64))).astype(np.float32)
    for kind in ("fp16", "int8"):
        s = Storage(kind, dim=16)
        proj = fit_projection(low[:200], 16)
        err = held_out_error(low[200:], s, proj, (1.0,))
        u = low[200:].astype(np.float64)
        u /= np.linalg.norm(u, axis=-1, keepdims=True)
        v = decode(encode("x", low[200:], s, proj), "x", s, 64, proj=proj).astype(np.float64)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        assert err == pytest.approx(np.abs(u @ u.T - v @ v.T).max(), rel=1e-6) and err < 0.02, (kind, err)
    full = g.normal(size=(300, 64))
    assert held_out_error(full[200:], Storage("int8", dim=8), fit_projection(full[:200], 8), (1.0,)) > 0.3


def test_sskd_cache_warns_where_a_basis_keeps_too_little_and_names_the_fix(caplog):
    from sskd.cache.build import report_fit

    g = np.random.default_rng(3)
    full = (g.normal(size=(1200, 100)) * 3).astype(np.float32)
    low = np.repeat(full[:, :1], 100, axis=1) + np.arange(100, dtype=np.float32)  # one direction
    embs = g.normal(size=(300, 64))
    with caplog.at_level("INFO"):
        for rows in (full, low):
            report_fit(
                "logits", Storage("topk", k=5, dim=8), rows[:100], fit_code(rows[100:], 8), (1.0, 4.0), True
            )
        report_fit("embed", Storage("int8", dim=8), embs, fit_projection(embs, 8), (1.0,), False)
    bad, good, proj = caplog.records
    assert bad.levelname == "WARNING" and good.levelname == "INFO" and proj.levelname == "WARNING"
    said = bad.getMessage()
    assert said.startswith(
        "logits stored as its top 5 over a 8-dimensional code: read back, its probabilities are "
    )
    assert (
        "% from the teacher's (total variation, mean over the 100 rows after the 4,096 it was fitted on, at T = 1, 4)"
        in said
    )
    assert "a larger code (top5-d16, if the shape allows) or `sskd bench cache --only --level NAME`" in said
    assert "more dims (--embed-dim 16" in proj.getMessage()
    assert (
        "(largest error of an entry, over the 300 rows it was fitted on, all there are)" in proj.getMessage()
    )


def test_q8_codes_every_score_within_half_a_step_of_the_row_range():
    row = np.array([[[-3.0, 1.0, 5.0, 0.3]]], np.float32)
    a = encode("logits", row, Storage("q8"))
    # midpoint 1, half-range 4: step 4/127, codes by hand
    assert a["logits.mid"][0, 0] == 1.0 and a["logits.step"][0, 0] == np.float16(4 / 127)
    assert a["logits.q"][0, 0].tolist() == [-127, 0, 127, round(-0.7 / float(np.float16(4 / 127)))]
    back = decode(a, "logits", Storage("q8"), 4)
    assert np.abs(back - row).max() <= float(np.float16(4 / 127)) / 2 + 1e-3
    logits = np.random.default_rng(0).normal(scale=3, size=(64, 4, 100)).astype(np.float32) + 40
    a = encode("logits", logits, Storage("q8"))
    back = decode(a, "logits", Storage("q8"), 100)
    # within half the row's stored step: codes around the fp16 midpoint, step = the larger half / 127
    step = a["logits.step"].astype(np.float32)[..., None]
    err = np.abs(back - logits)
    near = (logits.max(-1, keepdims=True) - logits < step) & (logits < logits.max(-1, keepdims=True))
    assert np.all(err[~near] <= np.broadcast_to(step, err.shape)[~near] / 2 + 1e-5)
    assert np.all(err <= step * 1.5 + 1e-5)  # near ties with the top class: one step lower
    assert np.array_equal(back.argmax(-1), logits.argmax(-1))
    # a near tie with the top class: the other score goes one step down (within 1.5 steps), the top stays
    tied = logits.copy()
    top = tied.argmax(-1)[..., None]
    np.put_along_axis(tied, (top + 1) % 100, np.take_along_axis(tied, top, -1) - 1e-3, -1)
    a = encode("logits", tied, Storage("q8"))
    back, step = decode(a, "logits", Storage("q8"), 100), a["logits.step"].astype(np.float32)
    assert np.array_equal(
        back, a["logits.mid"].astype(np.float32)[..., None] + a["logits.q"] * step[..., None]
    )
    assert np.array_equal(back.argmax(-1), tied.argmax(-1))
    assert np.all(np.abs(back - tied) <= step[..., None] * 1.5 + 1e-5)
    assert np.all(step <= (logits.max(-1) - logits.min(-1)) / 254 + 0.0157 / 127 + 1e-4)
    soft = torch.softmax(torch.from_numpy(tied) / 4, -1), torch.softmax(torch.from_numpy(back) / 4, -1)
    assert float((soft[0] - soft[1]).abs().max()) < 5e-3  # T = 4 probabilities, the tie one step apart
    assert Storage("q8").row_bytes(100) == 104 and Storage.parse("q8") == Storage("q8")


def test_a_q8_and_a_topk_cache_read_back_what_decode_gives(tmp_path):
    from sskd.bench.cache import _write_cache

    outputs = [{"name": "logits", "shape": [100], "topk": True, "cosine": False}]
    logits = torch.randn(40, 2, 100) * 3
    code = fit_code(logits.numpy().reshape(-1, 100), 16)
    for storage in (Storage("q8"), Storage("topk", k=25, t=4.0), Storage("topk", k=10, dim=16)):
        bases = {"logits": code} if storage.dim else {}
        folder = _write_cache(
            tmp_path / storage.name, outputs, {"logits": storage}, bases, {"logits": logits}, 40
        )
        reader = CacheReader(folder)
        got = reader.lookup(torch.tensor([4, 0, 2]), 0)["t_logits"].numpy()
        want = decode(encode("logits", logits.numpy(), storage, code), "logits", storage, 100, proj=code)
        assert reader.outputs[0]["storage"] == storage.to_json()
        assert np.array_equal(got, want[[4, 0, 2]])
        if storage.dim:  # the code's basis travels in the cache, checked against the manifest's hash
            assert all(np.array_equal(reader.bases["logits"][key], code[key]) for key in code)


def test_lookup_across_chunks_equals_each_row_decoded_on_its_own(tmp_path):
    """lookup decodes a one-chunk batch straight into place and a batch over several chunks into one
    array: both give, bit for bit, what decode gives row by row, in the order asked, at every storage."""
    from sskd.bench.cache import _write_cache
    from sskd.cache import chunk_path, teacher_arrays, write_chunk

    outputs = [
        {"name": "logits", "shape": [100], "topk": True, "cosine": False},
        {"name": "aux", "shape": [2, 40], "topk": True, "cosine": False},
        {"name": "embed", "shape": [16], "topk": False, "cosine": True},
    ]
    g = torch.Generator().manual_seed(3)
    values = {
        "logits": torch.randn(30, 2, 100, generator=g) * 3,
        "aux": torch.randn(30, 2, 2, 40, generator=g) * 3,
        "embed": torch.randn(30, 2, 16, generator=g),
    }
    levels = [
        {"logits": Storage("fp16"), "aux": Storage("fp16"), "embed": Storage("fp16")},
        {"logits": Storage("q8"), "aux": Storage("q8"), "embed": Storage("int8")},
        {
            "logits": Storage("topk", k=25, t=4.0),
            "aux": Storage("topk", k=5, t=3.0),
            "embed": Storage("int8"),
        },
        {  # codes under a top K, and a projection: the rows' bits must not depend on the batch either
            "logits": Storage("topk", k=10, dim=16),
            "aux": Storage("topk", k=5, dim=8),
            "embed": Storage("int8", dim=8),
        },
    ]
    fitted = {
        "logits": fit_code(values["logits"].numpy().reshape(-1, 100), 16),
        "aux": fit_code(values["aux"].numpy().reshape(-1, 40), 8),
        "embed": fit_projection(values["embed"].numpy().reshape(-1, 16), 8),
    }
    for i, storage in enumerate(levels):
        bases = {name: fitted[name] for name, s in storage.items() if s.dim}
        folder = _write_cache(tmp_path / str(i), outputs, storage, bases, values, 30)
        for c in chunk_path(folder, 0, 0, 0).parent.glob("*.safetensors"):
            c.unlink()
        for first, part in ((0, np.arange(0, 30, 3)), (1, np.arange(1, 30, 3)), (2, np.arange(2, 30, 3))):
            arrays = teacher_arrays(
                part, {k: v[part] for k, v in values.items()}, storage=storage, bases=bases
            )
            write_chunk(chunk_path(folder, 0, 0, first), arrays, first, 1)
        reader = CacheReader(folder)
        for ids in ([7, 0, 29, 4, 4, 11], [3, 9, 27, 0], [5], []):
            got = reader.lookup(torch.tensor(ids, dtype=torch.int64), 0)
            for o in outputs:
                name, width = o["name"], o["shape"][-1]
                want = [
                    decode(
                        encode(name, values[name][j : j + 1].numpy(), storage[name], bases.get(name)),
                        name,
                        storage[name],
                        width,
                        proj=bases.get(name),
                    )
                    for j in ids
                ]
                want = (
                    np.concatenate(want)
                    if ids
                    else np.empty((0,) + tuple(values[name].shape[1:]), np.float32)
                )
                assert got[f"t_{name}"].dtype == torch.float32, (i, name, ids)
                assert np.array_equal(got[f"t_{name}"].numpy(), want), (i, name, ids)


def test_compact_codes_scores_as_q8_where_no_larger_than_their_top_25():
    def outputs(**widths):
        return [{"name": n, "shape": [w], "topk": True, "cosine": False} for n, w in widths.items()]

    from sskd.cache.levels import compact, ladder

    code = Storage("topk", k=10, dim=64)
    assert compact(outputs(logits=100)) == {"logits": Storage("q8")}  # 104 B a row, as the top 25
    assert compact(outputs(logits=101)) == {
        "logits": code
    }  # q8 105 B, the top 25 104: the top 10 over a code
    assert compact(outputs(logits=10, aux=40)) == {"logits": Storage(), "aux": Storage("q8")}
    # HSSAKD's branch logits stay q8 where the logits go to a code (their top 25 of 400: 70 % off)
    assert compact(outputs(logits=1000, aux=4000)) == {"logits": code, "aux": Storage("q8")}
    assert [s.name for s in ladder(outputs(logits=100)[0])][:5] == [
        "fp16",
        "q8",
        "top10-d64",
        "top10-d32",
        "top50",
    ]
    assert [s.name for s in ladder(outputs(logits=1000)[0])][2:5] == ["top10-d128", "top10-d64", "top10-d32"]
    assert "q8" not in [s.name for s in ladder(outputs(logits=25)[0])]  # 25 classes or fewer stay fp16
    assert "top10-d8" not in [s.name for s in ladder(outputs(logits=25)[0])]  # and have no code
    with pytest.raises(
        SSKDError, match=r"--level logits:q8: logits \(10 wide\) cannot be stored as q8 \(q8 is"
    ):
        level_storage("logits:q8", SSKD_OUTPUTS)


def test_a_topk_storage_records_its_temperature_and_old_ones_read_as_before():
    s = Storage("topk", k=25, t=4.0)
    assert Storage.from_json(s.to_json()) == s and s.to_json()["t"] == 4.0
    old = {"kind": "topk", "k": 25, "dim": None}  # format 4 before the temperature: T = 1, t None
    assert Storage.from_json(old) == Storage("topk", k=25) and "t" not in Storage("topk", k=25).to_json()
    assert s.name == "top25"  # the level's name does not change with it


def test_methods_name_the_temperatures_they_read_their_scores_at():
    from sskd.methods import method_class

    def temps(name, **cfg):
        cls = method_class("student", name)
        return cls.topk_temperatures(cls.Config(**cfg) if cls.Config else None)

    assert temps("sskd") == {"logits": (4.0, 4.0)}
    assert temps("sskd", kd_T=2.0) == {"logits": (2.0, 4.0)}
    assert temps("hssakd") == {"logits": (3.0,), "aux": (3.0,)}
    assert temps("kd", T=6.0) == {"logits": (6.0,)}
    assert temps("dist", tau=1.0) == {"logits": (1.0,)}


def test_top_k_storage_takes_the_method_temperature_or_refuses_two():
    from sskd.cache.levels import at_temperatures

    storage = {"logits": Storage("topk", k=3), "embed": Storage("int8")}
    assert at_temperatures(storage, {"logits": (4.0, 4.0)}, "sskd") == {
        "logits": Storage("topk", k=3, t=4.0),
        "embed": Storage("int8"),
    }
    exact = {"logits": Storage(), "embed": Storage()}
    assert at_temperatures(exact, {"logits": (2.0, 4.0)}, "sskd") == exact  # nothing top-K: nothing to refuse
    with pytest.raises(SSKDError, match=r"--method sskd reads logits at temperatures 2 and 4: top-K keeps"):
        at_temperatures(storage, {"logits": (2.0, 4.0)}, "sskd")


def test_budget_picks_the_most_faithful_level_that_fits_and_sizes_are_hand_counted():
    # exact: 8 + 4 views x (10 + 64) x 2 = 600; embed int8: 8 + 4 x (20 + 66) = 352
    assert bytes_per_image(4, SSKD_OUTPUTS, {"logits": Storage(), "embed": Storage()}) == 600
    assert level_name(for_budget(4, SSKD_OUTPUTS, 600)) == "exact"
    assert level_name(for_budget(4, SSKD_OUTPUTS, 599)) == "logits:fp16+embed:int8"
    assert level_name(for_budget(4, SSKD_OUTPUTS, 300)) == "logits:fp16+embed:int8-d32"  # 8 + 4 x (20 + 34)
    with pytest.raises(
        SSKDError,
        match=r"--budget 100: no storage level fits; the smallest is "
        r"logits:fp16\+embed:int8-d16 at 160 B per image-epoch",
    ):
        for_budget(4, SSKD_OUTPUTS, 100)


def test_imagenet_default_is_compact_and_within_1024_bytes():
    img = imagenet_outputs(SSKD_OUTPUTS, 10)
    assert [o["shape"] for o in img] == [[1000], [512]]
    storage, why = default(img, IMAGENET["classes"])
    assert level_name(storage) == "logits:top10-d64+embed:int8-d128" and "compact" in why
    # 8 + 4 views x (10 x (2 + 2) + 64 + 2 + 128 + 2)
    assert bytes_per_image(4, img, storage) == 8 + 4 * (106 + 130) == 952 <= 1024
    assert level_name(default(SSKD_OUTPUTS, 10)[0]) == "exact"  # the digits: fp16 costs little
    # HSSAKD's branches on paper are ResNet-34's four, whatever the measured teacher has (resnet8: 3)
    hs = [
        {"name": "logits", "shape": [10], "topk": True, "cosine": False},
        {"name": "aux", "shape": [3, 40], "topk": True, "cosine": False},
    ]
    img = imagenet_outputs(hs, 10)
    assert [o["shape"] for o in img] == [[1000], [4, 4000]]
    assert (
        bytes_per_image(4, img, {"logits": Storage(), "aux": Storage()})
        == 8 + 4 * (2000 + 4 * 8000)
        == 136_008
    )
    storage = default(img, IMAGENET["classes"])[0]
    assert level_name(storage) == "logits:top10-d64+aux:q8"
    assert bytes_per_image(4, img, storage) == 8 + 4 * (106 + 4 * 4004) == 64_496  # docs/methods.md


# ---- bad input: one line each, before any work ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"embed_dim": 64}, r"--embed-dim 64: must be between 8 and 63, below the 64 dims of embed"),
        ({"embed_dim": 4}, r"--embed-dim 4: must be between 8 and 63"),
        ({"topk": 10}, r"--topk 10: must be between 1 and 9, below the 10 classes"),
        ({"exact": True, "topk": 3}, r"--exact stores every output in fp16: leave out --topk"),
        ({"budget": 512, "embed": "int8"}, r"--budget picks the level itself: leave out --embed"),
    ],
)
def test_bad_storage_requests_are_one_line(kw, match):
    with pytest.raises(SSKDError, match=match):
        check_request(SSKD_OUTPUTS, **kw)


def test_a_level_by_name_gives_each_output_its_storage():
    assert level_name(level_storage("exact", SSKD_OUTPUTS)) == "exact"
    # compact whatever the class count: 10 classes keep fp16 logits, 64-dim embeddings become int8 rows
    assert level_name(level_storage("compact", SSKD_OUTPUTS)) == "logits:fp16+embed:int8"
    storage = level_storage("logits:top3+embed:int8-d16", SSKD_OUTPUTS)
    assert storage == {"logits": Storage("topk", k=3), "embed": Storage("int8", dim=16)}
    assert level_storage("embed:fp16-d32", SSKD_OUTPUTS)["logits"] == Storage()  # left out: fp16
    assert requested(SSKD_OUTPUTS, 4, 10, level="logits:top3")[0]["logits"] == Storage("topk", k=3)


@pytest.mark.parametrize(
    ("level", "kw", "match"),
    [
        (
            "logits:int8",
            {},
            r"--level logits:int8: logits \(10 wide\) cannot be stored as int8 .*it allows fp16, top5",
        ),
        ("embed:top5", {}, r"embed \(64 wide\) cannot be stored as top5 \(top-K needs class scores"),
        (
            "logits:top10",
            {},
            r"logits \(10 wide\) cannot be stored as top10 \(top-K needs class scores and 0 < K < 10\)",
        ),
        ("embed:int8-d64", {}, r"cannot be stored as int8-d64"),
        (
            "logits:top5-d8",
            {},
            r"logits \(10 wide\) cannot be stored as top5-d8 \(top-K over a code needs class scores of more "
            r"than 25 classes",
        ),
        ("embed:top5-d8", {}, r"embed \(64 wide\) cannot be stored as top5-d8 \(top-K over a code"),
        ("logits:top5-dx", {}, r"unknown cache storage 'top5-dx' \(fp16, q8, topK, topK-dD,"),
        ("feat:fp16", {}, r"cache level 'feat:fp16': no output 'feat' \(this cache holds logits, embed\)"),
        (
            "logits:top9",
            {"exact": True},
            r"--level logits:top9 names every output's storage: leave out --exact",
        ),
        ("compact", {"topk": 3, "budget": 100}, r"leave out --topk, --budget"),
    ],
)
def test_a_bad_level_is_one_line_naming_the_output(level, kw, match):
    with pytest.raises(SSKDError, match=match):
        check_request(SSKD_OUTPUTS, level=level, **kw)


def test_embed_flags_on_a_method_without_cosine_embeddings_are_refused():
    with pytest.raises(SSKDError, match="--embed-dim: this method reads no embedding through cosines"):
        check_request([{"name": "logits", "shape": [100], "topk": True, "cosine": False}], embed_dim=16)


# ---- with a real (tiny) teacher -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ss_teacher(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("levels_teacher")
    common = ["--shards", digits_shards, *FAST]
    # The SS head gets 60 steps: after 10 its similarities were near ties, int8's 0.002 moved 13 % of the
    # rows' ranks, and the mask agreement hung on the machine's arithmetic (on an AMD EPYC VM 0.990 of the
    # subset's rows, where an Intel Xeon had passed); after 60 it was 1.0 there.
    assert run("train-teacher", "--arch", "resnet8", "--out", root / "t", "--max-steps", 10, *common) == 0
    assert (
        run("train-ss-head", "--teacher", root / "t", "--out", root / "ss", "--max-steps", 60, *common) == 0
    )
    return root / "ss"


SUBSET = "data.subset_fraction=0.2"  # a fifth of the digits (287 images): caches in seconds


def student_run(shards, teacher, *extra):
    cfg = load_config(None, [f"data.shards={shards}", "run.progress=false", SUBSET, *extra])
    return prepare(cfg, "student", teacher=str(teacher))


@pytest.fixture(scope="module")
def compact_cache(ss_teacher, digits_shards, tmp_path_factory):
    """The compact level of these shapes: 10 classes keep fp16 logits, 64-dim embeddings int8 (no projection)."""
    out = tmp_path_factory.mktemp("levels") / "c"
    build_cache(
        student_run(digits_shards, ss_teacher), out, epochs=1, batch_size=256, embed="int8", progress=False
    )
    return out


def test_a_topk_cache_says_how_much_probability_its_tail_holds(ss_teacher, digits_shards, tmp_path, caplog):
    from sskd.cache.levels import tail_mass

    # by hand: logits (2, 0, 0, 0) at T = 2, top 1 kept: the others hold 3 / (e + 3)
    a = encode("logits", np.array([[[2.0, 0, 0, 0]]], np.float32), Storage("topk", k=1, t=2.0))
    assert tail_mass(a, "logits", Storage("topk", k=1, t=2.0)) == pytest.approx(3 / (np.e + 3), abs=1e-3)
    with caplog.at_level("INFO"):
        build_cache(
            student_run(digits_shards, ss_teacher),
            tmp_path / "c",
            epochs=1,
            batch_size=256,
            topk=3,
            progress=False,
        )
    said = [r for r in caplog.records if "stored as its top 3" in r.getMessage()]
    assert (
        len(said) == 1
        and "% of the probability at T = 4 (mean over the first chunk's rows)" in said[0].getMessage()
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    mass = tail_mass(map_chunk(chunk_path(tmp_path / "c", 0, 0, 0)), "logits", Storage("topk", k=3, t=4.0))
    assert manifest["outputs"][0]["storage"]["t"] == 4.0  # SSKD's kd_T and tf_T
    assert f"hold {100 * mass:.1f} % of" in said[0].getMessage()  # the first chunk's rows
    assert said[0].levelname == ("WARNING" if mass > 0.01 else "INFO")


def test_compact_cache_keeps_the_selective_transfer_mask(compact_cache, ss_teacher, digits_shards):
    from pipelines import ViewLoader
    from sskd.bench.cache import _similarity
    from sskd.losses import select_rows
    from sskd.losses.pretext import own_image_targets
    from sskd.losses.sskd import target_rank
    from sskd.methods.sskd import SSKD
    from sskd.runs.models import load_run_model

    teacher, _ = load_run_model(ss_teacher)
    reader = CacheReader(compact_cache)
    spec = student_run(digits_shards, ss_teacher)
    assert (
        reader.level == "logits:fp16+embed:int8" and not (compact_cache / "projections.safetensors").exists()
    )
    agree, err, changed, n = 0, 0.0, 0, 0
    for batch in ViewLoader.for_run(spec, "train", batch_size=64).epoch(0):
        with torch.no_grad():
            live = SSKD.teacher_outputs(teacher.eval(), batch["views"])
        got = reader.lookup(batch["id"], 0)
        m = len(batch["id"])
        assert got["t_embed"].shape == (m, 4, 64) and got["t_logits"].shape == (m, 4, 10)
        a, c = _similarity(live["embed"]), _similarity(got["t_embed"])
        target = own_image_targets(m, 4, a.device)
        agree += int((select_rows(a, target, 0.75) == select_rows(c, target, 0.75)).sum())
        changed += int((target_rank(a, target) != target_rank(c, target)).sum())
        err = max(err, float((a - c).abs().max()))
        n += len(target)
    print(
        f"mask agreement {agree / n:.4f} of {n} rows, ranks changed {changed}, largest similarity error {err:.4f}"
    )
    assert agree / n >= 0.995, agree / n  # the target
    assert err < 0.02


def test_the_level_is_in_the_binding(compact_cache, ss_teacher, digits_shards):
    binding = student_run(digits_shards, ss_teacher).cache_binding()
    m = json.loads((compact_cache / "manifest.json").read_text())
    assert m["version"] == VERSION == 5 and m["binding"]["level"] == "logits:fp16+embed:int8"
    CacheReader(compact_cache, expected=binding)  # a run that names no level takes any
    CacheReader(compact_cache, expected={**binding, "level": "logits:fp16+embed:int8"})
    CacheReader(compact_cache, expected={**binding, "level": "compact"})  # the compact level of its shapes
    for asked in ("exact", "logits:fp16+embed:int8-d32"):
        with pytest.raises(
            SSKDError,
            match=rf"cache stores level logits:fp16\+embed:int8 but this run asks for {re.escape(asked)};",
        ):
            CacheReader(compact_cache, expected={**binding, "level": asked})


def test_a_method_that_cannot_use_a_level_is_refused_naming_both(compact_cache):
    from sskd.methods.sskd import SSKD

    m = json.loads((compact_cache / "manifest.json").read_text())
    check_usable(m, SSKD, {}, "c")  # the contrastive head's embeddings: cosines only
    with pytest.raises(SSKDError, match=r"c: stores embed as int8, which --method sskd cannot use"):
        check_usable(m, SSKD, {"wrapper_args": {"pretext": "rotation"}}, "c")


def test_a_cache_whose_tail_is_at_another_temperature_is_refused_naming_both():
    from sskd.methods.sskd import SSKD

    def manifest(storage):
        return {"outputs": [{"name": "logits", "shape": [100], "topk": True, "storage": storage.to_json()}]}

    at4 = manifest(Storage("topk", k=25, t=4.0))
    check_usable(at4, SSKD, {}, "c", {"logits": (4.0, 4.0)})
    with pytest.raises(
        SSKDError,
        match=r"c: stores logits as top25 with the tail's mass exact at T = 4, but this run "
        r"\(--method sskd\) reads it at T = 2 and 4; rebuild",
    ):
        check_usable(at4, SSKD, {}, "c", {"logits": (2.0, 4.0)})
    check_usable(manifest(Storage("topk", k=25)), SSKD, {}, "c", {"logits": (2.0, 2.0)})  # recorded none


@pytest.mark.slow
def test_dry_run_sizes_are_the_bytes_written(ss_teacher, digits_shards, tmp_path, capsys, caplog):
    from sskd.cache.build import dry_run

    caplog.set_level("INFO")
    for kw in ({"exact": True}, {"embed_dim": 16, "topk": 3}, {"budget": 300}):
        spec = student_run(digits_shards, ss_teacher)
        topk = kw.pop("topk", None)
        report = dry_run(spec, 1, topk=topk, **kw)
        out = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        build_cache(spec, out, epochs=1, batch_size=512, progress=False, topk=topk, **kw)
        written = sum(
            sum(a.nbytes for a in map_chunk(f).values()) for f in sorted(out.glob("epoch-0000/*.safetensors"))
        )
        reader = CacheReader(out)
        assert reader.level == report["level"]
        assert written == report["bytes_per_sample_epoch"] * reader.num_samples, (kw, reader.level)
    printed = capsys.readouterr().out
    assert "the ImageNet recipe on paper (1,281,167 images, 4 views, logits 1000, embed 512)" in printed
    # the projection fitted by the build scored on its rows (287 images x 4 views: fewer than 4,096)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embed projected to 16 dims")]
    assert len(said) == 1 and "over the 1,148 rows it was fitted on, all there are)" in said[0], said
    assert "logits:top10-d64+embed:int8-d128" in printed and "952" in printed


@pytest.mark.slow
def test_a_code_cache_at_100_classes_holds_the_dry_runs_bytes_and_reads_its_code(tmp_path, capsys, caplog):
    """KD on the 100-class digit pairs with its logits as the top 10 over a 32-dimensional code: the basis
    is fitted by `sskd cache` on the teacher's first rows and stored, the chunks hold the bytes the dry run
    counts, and every row reads back as its code by hand (centre + codes x step on the basis, the tail held
    at the 10th value, the top 10 over it) with the top class the teacher's."""
    import importlib.util
    from pathlib import Path

    from sskd.cache.build import dry_run
    from sskd.runs.models import load_run_model

    script = Path(__file__).parent / "scripts" / "digit_pairs.py"
    mod_spec = importlib.util.spec_from_file_location("digit_pairs", script)
    pairs = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(pairs)
    pairs.build(tmp_path / "src" / "cifar-100-python", n_train=300, n_test=100, seed=3)
    assert run("shard", "cifar100", tmp_path / "src", tmp_path / "shards", "--no-progress") == 0
    teacher = tmp_path / "t"
    common = ["--shards", tmp_path / "shards", *FAST]
    assert run("train-teacher", "--arch", "resnet8", "--out", teacher, "--max-steps", 5, *common) == 0
    cfg = load_config(None, [f"data.shards={tmp_path / 'shards'}", "run.progress=false", "student.method=kd"])
    spec = prepare(cfg, "student", teacher=str(teacher))
    level = "logits:top10-d32"
    report = dry_run(spec, 1, level=level)
    assert report["level"] == level and report["bytes_per_sample_epoch"] == 8 + 10 * 4 + 32 + 2
    with caplog.at_level("INFO"):
        out = build_cache(spec, tmp_path / "c", epochs=1, batch_size=128, progress=False, level=level)
    # the code scored as it was fitted, on all 300 rows (one view each: fewer than 4,096), at KD's T = 4
    said = [
        r.getMessage() for r in caplog.records if "over a 32-dimensional code: read back" in r.getMessage()
    ]
    assert (
        len(said) == 1
        and "(total variation, mean over the 300 rows it was fitted on, all there are, at T = 4)" in said[0]
    )
    chunks = sorted(out.glob("epoch-0000/*.safetensors"))
    written = sum(sum(a.nbytes for a in map_chunk(f).values()) for f in chunks)
    reader = CacheReader(out)
    assert reader.level == level and reader.manifest["version"] == VERSION
    assert written == report["bytes_per_sample_epoch"] * reader.num_samples == 82 * 300
    code = reader.bases["logits"]
    assert code["levels"].shape == (100, 32) and code["center"].shape == (100,)
    a = map_chunk(chunks[0])
    q = a["logits.q"].astype(np.float64) * a["logits.scale"].astype(np.float64)[..., None]
    topv = a["logits.topv"].astype(np.float32)
    want = np.minimum(code["center"] + q @ code_basis(code).T.astype(np.float64), topv[..., -1:])
    np.put_along_axis(want, a["logits.topi"].astype(np.int64), topv, -1)
    got = reader.lookup(torch.from_numpy(np.array(a["ids"])), 0)["t_logits"].numpy()
    assert np.allclose(got, want, atol=1e-5)
    # the teacher's own logits of these samples' view: the top 10 as stored, the rest within the code's error
    from pipelines import ViewLoader

    model, _ = load_run_model(teacher)
    batch = next(iter(ViewLoader.for_run(spec, "train", batch_size=64).epoch(0)))
    with torch.no_grad():
        live = model.eval()(batch["views"].flatten(0, 1)).numpy()
    stored = reader.lookup(batch["id"], 0)["t_logits"].numpy()[:, 0]
    assert np.array_equal(stored.argmax(-1), live.argmax(-1))
    rel = np.linalg.norm(stored - live) / np.linalg.norm(live - live.mean(-1, keepdims=True))
    print(f"100 classes, top10-d32 of a 5-step teacher: relative error {rel:.4f}")
    assert rel < 0.05


def test_cli_bad_input_is_one_line_before_any_work(ss_teacher, digits_shards, tmp_path, capsys):
    base = [
        "cache",
        "--teacher",
        ss_teacher,
        "--shards",
        digits_shards,
        "--epochs",
        1,
        "--out",
        tmp_path / "c",
    ]
    for extra, msg in (
        (
            ["--budget", 50],
            "--budget 50: no storage level fits; the smallest is logits:fp16+embed:int8-d16 at 160 B",
        ),
        (["--embed-dim", 4], "--embed-dim 4: must be at least 8"),
        (["--embed-dim", 100], "--embed-dim 100: must be between 8 and 63, below the 64 dims of embed"),
        (["--topk", 12], "--topk 12: must be between 1 and 9, below the 10 classes"),
        (["--level", "logits:top12"], "--level logits:top12: logits (10 wide) cannot be stored as top12"),
        (
            ["--level", "compact", "--exact"],
            "--level compact names every output's storage: leave out --exact",
        ),
    ):
        assert run(*base, *extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert not (tmp_path / "c").exists()


def test_format_4_caches_still_read(compact_cache, tmp_path):
    """A version-4 cache (the levels before the code under a top K) reads as it did: the same rows."""
    import shutil

    old = shutil.copytree(compact_cache, tmp_path / "v4")
    m = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**m, "version": 4}))
    ids = torch.from_numpy(
        np.array(map_chunk(sorted(old.glob("epoch-0000/*.safetensors"))[0])["ids"][[5, 1, 2]])
    )
    got, want = CacheReader(old).lookup(ids, 0), CacheReader(compact_cache).lookup(ids, 0)
    assert CacheReader(old).manifest["version"] == 4 and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_format_3_caches_still_read(tmp_path):
    """A version-3 cache (its top-K classes int32, no storage in the manifest) reads as it always did."""
    g = torch.Generator().manual_seed(0)
    logits, embed = torch.randn(5, 2, 12, generator=g), torch.randn(5, 2, 6, generator=g)
    top = logits.topk(3, dim=-1)
    arrays = {
        "ids": np.arange(5, dtype=np.int64),
        "logits.topv": top.values.numpy().astype(np.float16),
        "logits.topi": top.indices.numpy().astype(np.int32),
        "logits.lse": torch.logsumexp(logits, -1).numpy(),
        "embed": embed.numpy().astype(np.float16),
    }
    write_chunk(chunk_path(tmp_path, 0, 0, 0), arrays, 0, 1)
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "sskd-teacher-cache",
                "version": 3,
                "complete": True,
                "binding": {"method": "sskd"},
                "epochs": 1,
                "num_samples": 5,
                "topk": 3,
                "outputs": [
                    {"name": "logits", "shape": [12], "topk": True},
                    {"name": "embed", "shape": [6], "topk": False},
                ],
            }
        )
    )
    reader = CacheReader(tmp_path, expected={"method": "sskd"})
    assert reader.level == "logits:top3+embed:fp16"
    got = reader.lookup(torch.tensor([3, 0]), 0)
    want = dense_from_topk(
        arrays["logits.topv"].astype(np.float32), arrays["logits.topi"], arrays["logits.lse"], 12
    )
    assert np.array_equal(got["t_logits"].numpy(), want[[3, 0]])
    assert np.array_equal(got["t_embed"].numpy(), arrays["embed"][[3, 0]].astype(np.float32))


@pytest.mark.slow
def test_bench_json_has_exactly_the_keys(ss_teacher, digits_shards, tmp_path):
    from sskd.cli.cache import register_bench

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers(), argparse.HelpFormatter)
    args = parser.parse_args(
        [
            "cache",
            "--teacher",
            str(ss_teacher),
            "--shards",
            str(digits_shards),
            "--batch-size",
            "32",
            "--set",
            SUBSET,
            "--batches",
            "3",
            "--level",
            "logits:fp16+embed:fp16-d32",  # not on the front: measured because asked for
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert args.func(args) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert "logits:fp16+embed:fp16-d32" in [r["name"] for r in res["levels"]]
    assert set(res) == {"levels", "decode_samples_per_s", "default_level", "imagenet_bytes_per_image_epoch"}
    keys = {
        "name",
        "bytes_per_image_epoch",
        "term_rel_err",
        "grad_rel_err",
        "similarity_max_err",
        "mask_agreement",
        "top1_agreement",
        "read_samples_per_s",
    }
    assert all(set(r) == keys for r in res["levels"])
    exact = next(r for r in res["levels"] if r["name"] == "exact")
    assert set(exact["term_rel_err"]) >= {"kd", "tf", "ss"} and max(exact["term_rel_err"].values()) < 1e-2
    assert exact["mask_agreement"] > 0.99 and exact["top1_agreement"] > 0.99 and exact["grad_rel_err"] < 1e-2
    assert res["default_level"] == "exact" and res["imagenet_bytes_per_image_epoch"] == 952
    assert [r["bytes_per_image_epoch"] for r in res["levels"]] == sorted(
        (r["bytes_per_image_epoch"] for r in res["levels"]), reverse=True
    )


def test_bench_only_measures_the_levels_asked_for(ss_teacher, digits_shards, tmp_path):
    from sskd.cli.cache import register_bench

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers(), argparse.HelpFormatter)
    base = ["cache", "--teacher", str(ss_teacher), "--shards", str(digits_shards), "--batch-size", "32"]
    base += ["--set", SUBSET, "--batches", "2", "--only"]
    with pytest.raises(SSKDError, match=r"--only measures the --level levels: name at least one"):
        run_args = parser.parse_args(base)
        run_args.func(run_args)
    args = parser.parse_args([*base, "--level", "embed:int8-d16", "--json", str(tmp_path / "b.json")])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    # the level asked for, the exact reference and the default (exact here): nothing of the front
    assert [r["name"] for r in res["levels"]] == ["exact", "logits:fp16+embed:int8-d16"]
