"""qedit.core.linalg (truncated SVD, null-space projector, the MEMIT/AlphaEdit and ROME solves) and
qedit.core.delta / qedit.core.files (low-rank deltas, their reversible application, save/load, atomic writes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from qedit.core import linalg
from qedit.core.arch import Orientation
from qedit.core.delta import DELTAS_FILE, MANIFEST_FILE, Delta, LowRankDelta, applied, combine, load_deltas, save_deltas
from qedit.core.errors import QeditError
from qedit.core.files import atomic_path, refuse_same_file


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(s: torch.Tensor, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A (rows, cols) float64 matrix with singular values s."""
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(s.double()) @ v.t()


SPECTRUM = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])


# ---- svd_truncate ----------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 2, 4, 6])
def test_svd_truncate_by_rank_is_the_best_approximation(rank):
    m = _with_spectrum(SPECTRUM, 8, 6)
    a, b = linalg.svd_truncate(m, rank=rank)
    assert a.shape == (8, rank) and b.shape == (rank, 6) and a.dtype == torch.float32
    err = torch.linalg.matrix_norm(m - (a.double() @ b.double()))
    assert float(err) == pytest.approx(float(SPECTRUM[rank:].double().pow(2).sum().sqrt()), abs=1e-5)


def test_svd_truncate_rank_above_min_dim_keeps_everything():
    m = _with_spectrum(SPECTRUM, 8, 6)
    a, b = linalg.svd_truncate(m, rank=50)
    assert a.shape[1] == 6
    torch.testing.assert_close(a.double() @ b.double(), m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (0.6367, 1), (0.637, 2), (0.8, 2), (0.9, 3), (0.97, 4), (0.9999, 6), (1.0, 6)])
def test_svd_truncate_by_energy_keeps_the_fewest(energy, rank):
    # energy shares of SPECTRUM: 0.6368, 0.8660, 0.9679, 0.9934, 0.9997, 1.0
    m = _with_spectrum(SPECTRUM, 8, 6)
    a, _ = linalg.svd_truncate(m, energy=energy)
    assert a.shape[1] == rank


def test_svd_truncate_energy_at_an_exact_share_stops_there():
    s = torch.tensor([2.0, 1.0, 1.0])           # shares 4/6, 5/6, 1
    a, _ = linalg.svd_truncate(_with_spectrum(s, 5, 4), energy=5 / 6)
    assert a.shape[1] == 2


def test_svd_truncate_default_keeps_the_exact_rank():
    m = _with_spectrum(torch.tensor([4.0, 2.0, 1.0]), 9, 7)
    a, b = linalg.svd_truncate(m)
    assert a.shape[1] == 3
    torch.testing.assert_close(a.double() @ b.double(), m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(rank=0), dict(energy=0.0), dict(energy=1.5)])
def test_svd_truncate_rejects_bad_settings(kw):
    with pytest.raises(ValueError):
        linalg.svd_truncate(torch.eye(3), **kw)


# ---- null-space projector ----------------------------------------------------------------------

def _keys_with_dominant_span(n: int = 200, d: int = 16, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (n, d) that live in a k-dim subspace, plus 1e-3 noise; and an orthonormal basis of
    the remaining d-k directions (d, d-k)."""
    g = _gen(1)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    coef = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(3, 1, k, dtype=torch.float64)
    keys = coef @ basis[:, :k].t() + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return keys, basis[:, k:]


@pytest.mark.parametrize("relative", [False, True])
def test_null_space_projector_kills_the_dominant_directions(relative):
    keys, rest = _keys_with_dominant_span()
    cov = keys.t() @ keys / len(keys)
    p = linalg.null_space_projector(cov, threshold=1e-3, relative=relative)
    torch.testing.assert_close(p, p.t())
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)
    assert round(float(torch.trace(p))) == rest.shape[1]
    assert float((keys @ p).norm() / keys.norm()) < 1e-3          # P K0 ~ 0
    torch.testing.assert_close(p @ rest, rest, atol=1e-3, rtol=0)  # the unused directions pass


# ---- solves ------------------------------------------------------------------------------------

def _spd(d: int, seed: int = 2) -> torch.Tensor:
    x = torch.randn(3 * d, d, generator=_gen(seed), dtype=torch.float64)
    return x.t() @ x / (3 * d)


def test_solve_spd_solves():
    a, b = _spd(12), torch.randn(12, 3, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(a @ linalg.solve_spd(a, b), b)


def test_rank_one_update_maps_the_key_to_the_residual_with_least_change():
    cov, key, resid = _spd(10).float(), torch.randn(10, generator=_gen(4)), torch.randn(7, generator=_gen(5))
    u, v = linalg.rank_one_update(cov, key, resid)
    assert u.shape == (7, 1) and v.shape == (1, 10)
    torch.testing.assert_close((u @ v) @ key.double(), resid.double())
    # Any other v' with v'.k = 1 changes the ordinary keys more (v^T C v is minimal).
    other = key.double() / key.double().dot(key.double())
    c = cov.double()
    assert float(v[0] @ c @ v[0]) < float(other @ c @ other)


def test_rank_one_update_on_a_singular_covariance():
    """Fewer key tokens than dimensions: C is singular (Cholesky fails on its rounding noise).
    The update still maps k to the residual, leaves the sampled keys alone, and is the
    smallest such v (the null-space part of k over its squared norm), not noise blown up."""
    g = _gen(6)
    proj = torch.randn(64, 128, generator=g) * 0.3
    keys = torch.nn.functional.gelu(torch.randn(105, 64, generator=g) @ proj)    # (105, 128)
    k0, key = keys[:100], keys[100:].mean(0)
    cov = (k0.t() @ k0 / len(k0)).float()
    assert int(torch.linalg.cholesky_ex(cov.double()).info) != 0
    u, v = linalg.rank_one_update(cov, key, torch.ones(5))
    assert float(v[0] @ key.double()) == pytest.approx(1.0, abs=1e-9)
    assert float((k0.double() @ v[0]).abs().max()) < 1e-3
    evals, evecs = torch.linalg.eigh(cov.double())
    span = evecs[:, evals > 1e-6 * evals.max()]
    k_null = key.double() - span @ (span.t() @ key.double())
    assert float(v.norm()) <= 1.1 / float(k_null.norm())      # the former lstsq fallback: 8x this


def test_batch_update_is_the_least_squares_solution():
    """dW minimises ||dW K^T - R^T||^2 + tr(dW (C + l2 I) dW^T): compare with lstsq on the
    stacked system [K; L^T] X = [R; 0] with C + l2 I = L L^T."""
    g = _gen(7)
    keys, resid = torch.randn(4, 9, generator=g), torch.randn(4, 6, generator=g)
    cov = _spd(9, seed=8) * 0.5
    for l2 in (0.0, 0.3):
        dw = linalg.batch_update(keys, resid, cov, l2=l2)
        assert dw.shape == (6, 9) and dw.dtype == torch.float64
        chol = torch.linalg.cholesky(cov + l2 * torch.eye(9, dtype=torch.float64))
        a = torch.cat([keys.double(), chol.t()])
        b = torch.cat([resid.double(), torch.zeros(9, 6, dtype=torch.float64)])
        torch.testing.assert_close(dw, torch.linalg.lstsq(a, b).solution.t())


def test_batch_update_without_prior_hits_the_residuals_exactly():
    g = _gen(9)
    keys, resid = torch.randn(3, 8, generator=g), torch.randn(3, 5, generator=g)
    dw = linalg.batch_update(keys, resid, 1e-9 * torch.eye(8))
    torch.testing.assert_close(keys.double() @ dw.t(), resid.double(), atol=1e-6, rtol=0)


def test_batch_update_with_projector_keeps_preserved_keys():
    """AlphaEdit: with P the null-space projector of the preserved keys' covariance,
    dW K0 ~ 0, and an edit key in that null space is still mapped to its residual."""
    k0, rest = _keys_with_dominant_span()
    p = linalg.null_space_projector(k0.t() @ k0 / len(k0), threshold=1e-3)
    g = _gen(10)
    keys = (rest @ torch.randn(rest.shape[1], 2, generator=g, dtype=torch.float64)).t()      # (2, 16), in the null space
    keys = keys + k0[:2]                                                                     # plus a preserved part
    resid = torch.randn(2, 5, generator=g, dtype=torch.float64)
    dw = linalg.batch_update(keys, resid, torch.zeros(16, 16), projector=p, l2=1e-6)
    assert float((k0 @ dw.t()).norm() / (keys @ dw.t()).norm()) < 1e-2
    torch.testing.assert_close(keys @ dw.t(), resid, atol=1e-3, rtol=1e-3)
    # the closed form of the docstring: dW = R^T K P ((C + K^T K) P + l2 I)^-1
    gram = keys.t() @ keys
    expected = resid.t() @ keys @ p @ torch.linalg.inv(gram @ p + 1e-6 * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(dw, expected, atol=1e-6, rtol=1e-5)


# ---- deltas --------------------------------------------------------------------------------------

def _delta(name: str, out: int, inp: int, rank: int, orientation=Orientation.OUT_IN, seed: int = 0, **kw) -> LowRankDelta:
    g = _gen(seed)
    return LowRankDelta(name, kw.pop("layer", 0), torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g),
                        kw.pop("scale", 1.0), orientation, kw.pop("meta", {}))


def test_low_rank_delta_math():
    d = _delta("w", 5, 3, 2, Orientation.IN_OUT, scale=0.5)
    assert d.rank == 2 and d.shape == (5, 3)
    torch.testing.assert_close(d.dense(), 0.5 * d.a @ d.b)
    torch.testing.assert_close(d.stored_dense(), d.dense().t())                 # stored (in, out)
    keys = torch.randn(4, 3, generator=_gen(1))
    torch.testing.assert_close(d.output_change(keys), keys @ d.dense().t())
    torch.testing.assert_close(d.scaled(-2.0).dense(), -2.0 * d.dense())
    assert d.norm() == pytest.approx(float(torch.linalg.matrix_norm(d.dense())))
    assert _delta("w", 5, 3, 2).stored_dense().shape == (5, 3)
    with pytest.raises(ValueError):
        LowRankDelta("w", 0, torch.zeros(5, 2), torch.zeros(3, 3))


def test_combine_adds_ranks_and_changes():
    d1, d2 = _delta("w", 6, 4, 1, seed=1, scale=2.0), _delta("w", 6, 4, 2, seed=2)
    other = _delta("v", 6, 4, 1, seed=3)
    merged = {d.name: d for d in combine([d1, other, d2])}
    assert merged["w"].rank == 3 and merged["v"] is other
    torch.testing.assert_close(merged["w"].dense(), d1.dense() + d2.dense())


def test_dense_delta_to_low_rank():
    dense = _with_spectrum(torch.tensor([3.0, 1.0]), 6, 5).float()
    lr = Delta("w", 2, dense, Orientation.IN_OUT).to_low_rank()
    assert lr.rank == 2 and lr.layer == 2 and lr.orientation is Orientation.IN_OUT
    torch.testing.assert_close(lr.dense(), dense, atol=1e-5, rtol=0)


class _TwoLayouts(nn.Module):
    """One torch Linear (weight (out, in)) and one GPT-2 Conv1D (weight (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.lin = nn.Linear(4, 6)
        self.conv = Conv1D(6, 4)       # nf=6 outputs, nx=4 inputs


def test_applied_puts_each_orientation_in_the_right_place_and_restores_bit_exactly():
    model = _TwoLayouts()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    d_lin = _delta("lin.weight", 6, 4, 2, Orientation.OUT_IN, seed=1)
    d_conv = _delta("conv.weight", 6, 4, 2, Orientation.IN_OUT, seed=2)
    x = torch.randn(3, 4, generator=_gen(3))
    with torch.no_grad():
        y_lin, y_conv = model.lin(x), model.conv(x)
        with applied(model, [d_lin, d_conv, d_lin.scaled(0.5)]):   # two deltas on one weight add up
            torch.testing.assert_close(model.lin(x) - y_lin, 1.5 * d_lin.output_change(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.conv(x) - y_conv, d_conv.output_change(x), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), f"{name} is not restored bit for bit"


def test_applied_restores_when_the_block_raises_and_nests():
    model = _TwoLayouts()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    d1, d2 = _delta("lin.weight", 6, 4, 1, seed=4), _delta("lin.weight", 6, 4, 1, seed=5)
    with pytest.raises(RuntimeError, match="inside"):
        with applied(model, [d1]):
            with applied(model, [d2]):
                assert not torch.equal(model.lin.weight, original["lin.weight"])
                raise RuntimeError("inside")
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("bad", [_delta("missing.weight", 6, 4, 1), _delta("conv.weight", 6, 4, 1, Orientation.OUT_IN)])
def test_applied_refuses_bad_deltas_and_changes_nothing(bad):
    model = _TwoLayouts()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(QeditError, match="weight"):
        with applied(model, [_delta("lin.weight", 6, 4, 1), bad]):
            pass
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), f"{name} was changed by an application that failed"


def test_save_and_load_deltas_round_trip(tmp_path):
    deltas = [_delta("a.weight", 6, 4, 1, layer=3, scale=0.25, meta={"subject": "Eiffel Tower", "nll": 0.5}),
              _delta("b.weight", 5, 7, 3, Orientation.IN_OUT, seed=4, layer=5)]
    save_deltas(tmp_path, deltas, {"method": "rome", "facts": [{"prompt": "p"}]})
    loaded, manifest = load_deltas(tmp_path)
    assert manifest["method"] == "rome" and manifest["facts"] == [{"prompt": "p"}] and len(manifest["deltas"]) == 2
    for got, want in zip(loaded, deltas, strict=True):
        assert (got.name, got.layer, got.scale, got.orientation, got.meta) == (want.name, want.layer, want.scale,
                                                                                  want.orientation, want.meta)
        assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DELTAS_FILE, MANIFEST_FILE])


def test_load_deltas_errors_name_the_file(tmp_path):
    with pytest.raises(QeditError, match=MANIFEST_FILE):
        load_deltas(tmp_path)
    save_deltas(tmp_path, [_delta("a.weight", 3, 3, 1)], {})
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(QeditError, match="corrupt"):
        load_deltas(tmp_path)
    save_deltas(tmp_path, [_delta("a.weight", 3, 3, 1)], {})
    (tmp_path / DELTAS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(QeditError, match="corrupt"):
        load_deltas(tmp_path)
    save_deltas(tmp_path, [_delta("a.weight", 3, 3, 1)], {})
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["deltas"][0]["index"] = 7
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(QeditError, match="corrupt"):
        load_deltas(tmp_path)


# ---- atomic writes ---------------------------------------------------------------------------------

def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"           # nothing visible before the end
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    old = tmp_path / "old.json"
    old.write_text("keep")
    with pytest.raises(QeditError, match="nothing was written"):
        with atomic_path(old) as tmp:
            tmp.write_text("partial")
            raise OSError(28, "No space left on device")
    assert old.read_text() == "keep" and os.listdir(tmp_path) == ["old.json"]


def test_save_deltas_failure_leaves_no_files(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*_args, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(QeditError, match="nothing was written"):
        save_deltas(tmp_path / "out", [_delta("a.weight", 3, 3, 1)], {})
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_refuse_same_file(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF")
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    for out in (src, link, tmp_path / "." / "model.gguf"):
        with pytest.raises(QeditError, match="own input"):
            refuse_same_file(Path(out), tmp_path / "facts.jsonl", src)
    refuse_same_file(tmp_path / "other.gguf", src)


def test_edit_keys_round_trip(tmp_path):
    from qedit.core.delta import LowRankDelta, load_deltas, load_edit_keys, save_deltas

    d = LowRankDelta("model.layers.1.mlp.down_proj.weight", 1, torch.randn(8, 2), torch.randn(2, 16))
    keys = {1: torch.randn(3, 16)}
    save_deltas(tmp_path / "a", [d], {"method": "rome"}, keys=keys)
    assert torch.equal(load_edit_keys(tmp_path / "a")[1], keys[1])
    assert len(load_deltas(tmp_path / "a")[0]) == 1
    save_deltas(tmp_path / "b", [d], {"method": "rome"})
    assert load_edit_keys(tmp_path / "b") == {}
