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


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_blocks_lse_and_padding(dtype, splits):
    """The flat block grid with filler blocks and rows, the log-sum-exp output, and keys
    split over programs (combined after)."""
    from vllm_elastic.kernels.grid import attention_block_m, row_blocks
    from vllm_elastic.kernels import paged_attention_blocks

    g = torch.Generator().manual_seed(11)
    heads, dim = 3, 64
    rows, lens = [5, 0, 37], [50, 20, 130]
    k, v, maps = make_paged(g, lens, heads, dim, 16, dtype)
    T = sum(rows) + 6  # filler rows past the last request
    starts = [0, 5, 5, 42]
    bm = attention_block_m(max(rows))
    reqs, brow = row_blocks(starts, bm)
    pad = 4  # filler blocks (request -1)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    table = torch.nn.utils.rnn.pad_sequence(maps, batch_first=True).to(**i32)
    q = torch.randn(T, heads, dim, generator=g).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((T, heads), float("nan"), device=DEVICE)
    paged_attention_blocks(q, torch.tensor(reqs.tolist() + [-1] * pad, **i32),
                           torch.tensor(brow.tolist() + [0] * pad, **i32), torch.tensor(starts, **i32),
                           torch.tensor(lens, **i32), table, k, v, bm, out=out, lse=lse,
                           splits=splits)
    if splits == 1:
        assert torch.isnan(out[42:]).all() and torch.isnan(lse[42:]).all()  # untouched
    for r in range(3):
        a, b = starts[r], starts[r + 1]
        if a == b:
            continue
        kr, vr = k[maps[r]].double(), v[maps[r]].double()
        s = torch.einsum("nhd,khd->hnk", q[a:b].double(), kr) / math.sqrt(dim)
        ref = torch.einsum("hnk,khd->nhd", torch.softmax(s, -1), vr)
        assert rel_err(out[a:b], ref) <= TOL[dtype]
        ref_lse = torch.logsumexp(s, -1).t() / math.log(2.0)
        assert rel_err(lse[a:b], ref_lse) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_rows(dtype):
    """Rows' norm, the tracked rows' previous inputs normed, then the layer-input write."""
    from model_executor.layers import rms_norm
    from vllm_elastic.kernels import norm_rows_triton

    g = torch.Generator().manual_seed(5)
    rows, d, n_slots = 9, 384, 40
    h = torch.randn(rows, d, generator=g).to(dtype).to(DEVICE)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEVICE)
    xc = torch.randn(n_slots, d, generator=g).to(dtype).to(DEVICE)
    before = xc.clone()
    x_slot = torch.tensor([7, 3, -1, 12, 30, -1, 0, 5, 9], dtype=torch.int32, device=DEVICE)
    old_of_row = torch.tensor([1, -1, -1, 0, 2, -1, -1, -1, -1], dtype=torch.int32,
                              device=DEVICE)
    y = norm_rows_triton(h, w, 1e-5, xc, x_slot, old_of_row, 3)
    assert rel_err(y[:rows], rms_norm(h.double(), w.double(), 1e-5)) <= TOL[dtype]
    for j, row in ((0, 3), (1, 0), (2, 4)):
        ref = rms_norm(before[int(x_slot[row])].double()[None], w.double(), 1e-5)[0]
        assert rel_err(y[rows + j], ref) <= TOL[dtype]
    written = x_slot >= 0
    assert torch.equal(xc[x_slot[written].long()], h[written])
    untouched = torch.ones(n_slots, dtype=torch.bool, device=DEVICE)
    untouched[x_slot[written].long()] = False
    assert torch.equal(xc[untouched], before[untouched])
    y2 = norm_rows_triton(h, w, 1e-5, None, None, None, 0)
    assert torch.equal(y2, y[:rows])


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
    """RoPE on q and k, K/V written at the rows' slots (not for slot -1), each written
    slot's previous K kept when asked; q alone from a q-only projection."""
    from model_executor.layers import RotaryEmbedding
    from vllm_elastic.kernels import rope_kv_write_triton

    g = torch.Generator().manual_seed(2)
    rows, heads, dim, slots_n = 29, 6, 64, 200
    rope = RotaryEmbedding(dim, 500000.0, 4096, torch.device(DEVICE))
    qkv = torch.randn(rows, 3, heads, dim, generator=g).to(dtype).to(DEVICE)
    pos = torch.randint(0, 4096, (rows,), generator=g).to(DEVICE)
    slots = torch.randperm(slots_n, generator=g)[:rows].to(DEVICE)
    slots[[4, 17]] = -1  # filler rows: no K/V write
    kc = torch.randn(slots_n, heads, dim, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn_like(kc)
    k_before, v_before = kc.clone(), vc.clone()
    k_prev = torch.full((rows, heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    q = rope_kv_write_triton(qkv, pos, slots, rope.cos, rope.sin, kc, vc, k_prev)
    q0, k0, v0 = qkv.double().unbind(1)
    assert rel_err(q, rope.apply(q0, pos)) <= TOL[dtype]
    w = slots >= 0
    assert rel_err(kc[slots[w]], rope.apply(k0, pos)[w]) <= TOL[dtype]
    assert torch.equal(vc[slots[w]], qkv[w, 2])
    untouched = torch.ones(slots_n, dtype=torch.bool, device=DEVICE)
    untouched[slots[w]] = False
    assert torch.equal(kc[untouched], k_before[untouched])
    assert torch.equal(vc[untouched], v_before[untouched])
    assert torch.equal(k_prev[w], k_before[slots[w]])
    assert torch.isnan(k_prev[~w]).all()
    q_only = rope_kv_write_triton(qkv[:, :1], pos, None, rope.cos, rope.sin, None, None)
    assert torch.equal(q_only, q)


@pytest.mark.parametrize("final", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_probe(dtype, final):
    """Drift cosine (over heads) and window mass against `attention_probs` per request.

    Probe rows are read through an index list, as from a layer's query rows; the old keys
    are the new ones except at this step's rows, whose previous K is in k_prev. `final`:
    per-row cosine sums; else the head sums (what tensor parallelism all-reduces)."""
    from vllm_elastic.core.attention import attention_probs
    from vllm_elastic.core.fused.layers import drift_from_sums
    from vllm_elastic.kernels import drift_probe, probe_lse

    g = torch.Generator().manual_seed(3)
    heads, dim = 8, 64
    lens = [120, 700, 65]
    n_track = [3, 0, 1]
    n_win = [16, 5, 16]
    R = len(lens)
    k_now, _, maps = make_paged(g, lens, heads, dim, 16, dtype)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    n_probe = [t + w for t, w in zip(n_track, n_win)]
    # The layer's rows: a few positions of each request, scattered in the row order.
    n_rows = [40, 10, 30]
    T = sum(n_rows)
    row_pos = [torch.randperm(n, generator=g)[:m] for n, m in zip(lens, n_rows)]
    row_req = torch.cat([torch.full((m,), r) for r, m in enumerate(n_rows)])
    order = torch.randperm(T, generator=g)
    k_prev = torch.randn(T, heads, dim, generator=g).to(dtype).to(DEVICE)
    key_row = torch.full((R, max(lens)), -1, dtype=torch.int32)
    k_old = k_now.clone()
    flat = torch.cat(row_pos)
    for j in range(T):  # row order[j] is request row_req[order[j]]'s position ...
        i = int(order[j])
        r = int(row_req[i])
        p = int(flat[i])
        key_row[r, p] = j
        k_old[maps[r][p]] = k_prev[j]
    key_row = key_row.to(DEVICE)
    q_rows = torch.randn(T, heads, dim, generator=g).to(dtype).to(DEVICE)
    probe_idx = torch.cat([torch.nonzero(row_req[order] == r).flatten()[:n]
                           for r, n in enumerate(n_probe)]).to(**i32)
    probe_start = torch.tensor([0, 19, 24, 41], **i32)
    old_start = torch.tensor([0, 3, 3, 4], **i32)
    q_old = torch.randn(sum(n_track), heads, dim, generator=g).to(dtype).to(DEVICE)
    b = batch_of(maps, lens).device_meta(torch.device(DEVICE))
    lse_old = probe_lse(q_old, old_start, b["kv_lens"], b["slot_table"], k_now, 32,
                        key_row, k_prev)
    # The rows' log-sum-exp over the new keys (what the attention kernel hands over).
    lse = torch.zeros(T, heads, device=DEVICE)
    lse[probe_idx.long()] = probe_lse(q_rows[probe_idx.long()].contiguous(), probe_start,
                                      b["kv_lens"], b["slot_table"], k_now, 32)
    max_len = b["slot_table"].shape[1]
    mass = torch.zeros(R, max_len, device=DEVICE)
    row_cos = torch.zeros(sum(n_track), device=DEVICE)
    acc = None if final else torch.zeros(3, sum(n_track), max_len, device=DEVICE)
    drift_probe(q_rows, lse, probe_idx, probe_start, torch.tensor(n_track, **i32),
                torch.tensor(n_track, **i32), q_old, lse_old, old_start, b["kv_lens"],
                b["slot_table"], k_now, key_row, k_prev, 32, mass, row_cos=row_cos, acc=acc)
    per_row = row_cos if final else drift_from_sums(acc)
    for r in range(R):
        kr_old = k_old[maps[r]].double()
        kr_now = k_now[maps[r]].double()
        a = int(probe_start[r])
        t, w = n_track[r], n_win[r]
        qp = q_rows[probe_idx[a:a + t + w].long()].double()
        ref_mass = attention_probs(qp[t:], kr_now).sum(dim=(0, 1))
        assert rel_err(mass[r, :lens[r]], ref_mass) <= TOL[dtype]
        if t:
            o0 = int(old_start[r])
            po = attention_probs(q_old[o0:o0 + t].double(), kr_old)
            pn = attention_probs(qp[:t], kr_now)
            cos = (po * pn).sum(0) / ((po * po).sum(0).sqrt() * (pn * pn).sum(0).sqrt())
            got = per_row[o0:o0 + t]
            assert rel_err(got, cos.sum(-1)) <= TOL[dtype]
            assert math.isclose(got.sum().item(), cos.sum().item(), rel_tol=TOL[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_fused_path_kernels_and_graphs_fp32(model_dir, dev_prompts):
    """The fused path with kernels and CUDA graphs gives the tokens and statistics of the
    same path with torch operations (float32, TF32 off), for requests that refresh (the
    row pass chunked), block policies and a mixed batch; replays included."""
    from vllm_elastic.core import Engine, GenerationParams
    from vllm_elastic.kernels import use_kernels

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eng = Engine.from_pretrained(model_dir, device="cuda", max_batch_size=8,
                                     max_request_tokens=512)
        eng.runner.fused = True
        prompts = dev_prompts[:8]
        for params in ([GenerationParams.from_dict({"policy": "elastic", "gen_length": 96})]
                       * 8, [GenerationParams.from_dict({"policy": p, "gen_length": 64})
                             for p in ("none", "dual", "prefix", "dkv") * 2]):
            use_kernels(False)
            ref = eng.generate(prompts, params)
            use_kernels(True)
            for _ in range(2):  # the second run replays graphs captured in the first
                got = eng.generate(prompts, params)
                assert [r.token_ids for r in got] == [r.token_ids for r in ref]
                assert [r.stats for r in got] == [r.stats for r in ref]
        counts = eng.runner.pass_counts()
        assert counts["replayed"] > 0 and counts["captured"] > 0, counts
        assert counts["capture_failed"] == 0, counts
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        use_kernels(True)
