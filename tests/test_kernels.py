"""Triton kernels against their plain torch references, on fresh random inputs.

Runs on CUDA (bf16: rel. error <= 1e-2; fp32: <= 1e-4). Without CUDA every test is
skipped, unless VLLM_ELASTIC_TRITON_CPU=1 and TRITON_INTERPRET=1 are set (Triton's
interpreter on CPU, float32 only; slow; for kernel development).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = (os.environ.get("VLLM_ELASTIC_TRITON_CPU") == "1"
             and os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)

pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or the Triton interpreter)")

DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float32]
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_paged(gen: torch.Generator, lens: list[int], heads: int, dim: int, page: int,
               dtype: torch.dtype):
    """Random K/V pools with shuffled pages and each request's slot map."""
    pages_needed = [-(-n // page) for n in lens]
    total = sum(pages_needed) + 3
    perm = torch.randperm(total, generator=gen).tolist()
    k = torch.randn(total * page, heads, dim, generator=gen).to(dtype)
    v = torch.randn(total * page, heads, dim, generator=gen).to(dtype)
    slot_maps, a = [], 0
    for n, npg in zip(lens, pages_needed):
        pg = torch.tensor(perm[a:a + npg])
        a += npg
        slot_maps.append((pg[:, None] * page + torch.arange(page)[None, :]).reshape(-1)[:n])
    return k.to(DEVICE), v.to(DEVICE), [s.to(DEVICE) for s in slot_maps]


def batch_of(slot_maps, rows):
    from vllm_elastic.core.attention import RaggedBatch

    offs = [0]
    for n in rows:
        offs.append(offs[-1] + n)
    return RaggedBatch(offs, slot_maps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    ([17], [600]), ([1, 40, 300], [90, 700, 1600]), ([1000, 16, 0, 33], [1000, 130, 64, 77]),
])
def test_paged_attention(dtype, case):
    from vllm_elastic.core.attention import paged_attention_torch
    from vllm_elastic.kernels import paged_attention_triton

    rows, lens = case
    g = torch.Generator().manual_seed(hash((str(dtype), str(case))) % 2**31)
    heads, dim = 4, 64 if dtype == torch.float32 else 128
    k, v, maps = make_paged(g, lens, heads, dim, 16, dtype)
    b = batch_of(maps, rows)
    q = torch.randn(sum(rows), heads, dim, generator=g).to(dtype).to(DEVICE)
    out = paged_attention_triton(q, b, k, v)
    ref = paged_attention_torch(q.double(), b, k.double(), v.double())
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    from model_executor.layers import rms_norm
    from vllm_elastic.kernels import rms_norm_triton

    g = torch.Generator().manual_seed(1)
    for rows, d in [(1, 384), (37, 4096), (5, 100)]:
        x = (torch.randn(rows, d, generator=g) * 3).to(dtype).to(DEVICE)
        w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEVICE)
        assert rel_err(rms_norm_triton(x, w, 1e-5), rms_norm(x.double(), w.double(), 1e-5)
                       ) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_and_silu_mul(dtype):
    from model_executor.layers import rms_norm
    from vllm_elastic.kernels import add_rms_norm_triton, silu_mul_triton

    g = torch.Generator().manual_seed(4)
    for rows, d in [(3, 384), (21, 4096)]:
        h = torch.randn(rows, d, generator=g).to(dtype).to(DEVICE)
        o = torch.randn(rows, d, generator=g).to(dtype).to(DEVICE)
        w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEVICE)
        hs, y = add_rms_norm_triton(h, o, w, 1e-5)
        assert torch.equal(hs, h + o)
        assert rel_err(y, rms_norm((h + o).double(), w.double(), 1e-5)) <= TOL[dtype]
        gu = torch.randn(rows, 2 * d, generator=g).to(dtype).to(DEVICE)
        gate, up = gu.double().chunk(2, dim=-1)
        assert rel_err(silu_mul_triton(gu), torch.nn.functional.silu(gate) * up) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write(dtype):
    from model_executor.layers import RotaryEmbedding
    from vllm_elastic.kernels import rope_kv_write_triton

    g = torch.Generator().manual_seed(2)
    rows, heads, dim, slots_n = 29, 6, 64, 200
    rope = RotaryEmbedding(dim, 500000.0, 4096, torch.device(DEVICE))
    qkv = torch.randn(rows, 3, heads, dim, generator=g).to(dtype).to(DEVICE)
    pos = torch.randint(0, 4096, (rows,), generator=g).to(DEVICE)
    slots = torch.randperm(slots_n, generator=g)[:rows].to(DEVICE)
    kc = torch.full((slots_n, heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    vc = kc.clone()
    q = rope_kv_write_triton(qkv, pos, slots, rope.cos, rope.sin, kc, vc)
    q0, k0, v0 = qkv.double().unbind(1)
    assert rel_err(q, rope.apply(q0, pos)) <= TOL[dtype]
    assert rel_err(kc[slots], rope.apply(k0, pos)) <= TOL[dtype]
    assert torch.equal(vc[slots], qkv[:, 2])
    q_only = rope_kv_write_triton(qkv[:, :1], pos, None, rope.cos, rope.sin, None, None)
    assert torch.equal(q_only, q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_probe(dtype):
    """Drift cosine (over heads) and window mass against `attention_probs` per request."""
    from vllm_elastic.core.attention import attention_probs
    from vllm_elastic.kernels import drift_from_sums, probe_now, probe_old

    g = torch.Generator().manual_seed(3)
    heads, dim = 4, 64
    lens = [120, 700, 65]
    n_track = [3, 0, 1]
    n_win = [16, 5, 16]
    k_old, _, maps = make_paged(g, lens, heads, dim, 16, dtype)
    k_now = k_old + (0.3 * torch.randn(k_old.shape, generator=g)).to(dtype).to(DEVICE)
    b = batch_of(maps, lens).device_meta(torch.device(DEVICE))
    R = len(lens)
    q_old = torch.randn(sum(n_track), heads, dim, generator=g).to(dtype).to(DEVICE)
    q_now = torch.randn(sum(t + w for t, w in zip(n_track, n_win)), heads, dim,
                        generator=g).to(dtype).to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    old_start = torch.tensor([0, 3, 3, 4], **i32)
    starts = torch.tensor([0, 19, 24, 41], **i32)
    old = probe_old(q_old, old_start, b["kv_lens"], b["slot_table"], k_old, 20)
    max_len = b["slot_table"].shape[1]
    acc = torch.zeros(3, sum(n_track), max_len, device=DEVICE)
    mass = torch.zeros(R, max_len, device=DEVICE)
    probe_now(q_now, starts, b["kv_lens"], b["slot_table"], k_now, 20,
              torch.tensor(n_track, **i32), torch.tensor(n_track, **i32), old, old_start,
              acc, mass)
    per_row = drift_from_sums(acc)
    for r in range(R):
        kr_old = k_old[maps[r]].double()
        kr_now = k_now[maps[r]].double()
        a = int(starts[r])
        t, w = n_track[r], n_win[r]
        win = attention_probs(q_now[a + t:a + t + w].double(), kr_now)
        ref_mass = win.sum(dim=(0, 1))
        assert rel_err(mass[r, :lens[r]], ref_mass) <= TOL[dtype]
        assert (mass[r, lens[r]:] == 0).all()
        if t:
            o0 = int(old_start[r])
            po = attention_probs(q_old[o0:o0 + t].double(), kr_old)
            pn = attention_probs(q_now[a:a + t].double(), kr_now)
            assert rel_err(old[o0:o0 + t, :, :lens[r]].transpose(0, 1), po) <= TOL[dtype]
            cos = (po * pn).sum(0) / ((po * po).sum(0).sqrt() * (pn * pn).sum(0).sqrt())
            got = per_row[o0:o0 + t]
            assert rel_err(got, cos.sum(-1)) <= TOL[dtype]
            assert math.isclose(got.sum().item(), cos.sum().item(), rel_tol=TOL[dtype])
