"""The compiled paged-attention op against the PyTorch reference, and the reference against dense attention.

The reference is checked against a dense float64 softmax(QK^T)V per sequence, on a cache
read slot by slot; the op is checked against the reference on random shapes (GQA ratios,
block sizes, partial blocks, shuffled block tables, cached prefixes, several sequences
per call), under every instruction set this CPU runs (`generic` has the AVX-512 build's
tile shapes, so AVX-512's code paths are exercised on any host). The op's tests skip
when the library cannot be built here; the reference's always run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from pdserve.engine import kernels
from pdserve.engine.kernels import reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


# ---- Problems ---------------------------------------------------------------------------

@dataclass
class Paged:
    """One layer's paged cache and the sequences in it.

    Block 0 pads the block tables and holds NaN: the op must never read it. The reference
    reads padding (then masks it), so it gets `clean()`, where block 0 is zeros, as in
    KVCache.
    """

    k_cache: torch.Tensor  # [Hkv, S, D]
    v_cache: torch.Tensor
    tables: list[list[int]]  # each sequence's blocks, in order
    block_size: int

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k_cache.clone(), self.v_cache.clone()
        k[:, : self.block_size] = 0
        v[:, : self.block_size] = 0
        return k, v

    def table_tensor(self) -> torch.Tensor:
        """[N, M] int32, padded with block 0 (which must not be read)."""
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)


def make_paged(lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               order: str, rng: random.Random) -> Paged:
    """Sequences of lens keys; their blocks consecutive, shuffled, or every other one."""
    counts = [-(-n // block_size) for n in lens]
    total = sum(counts)
    if order == "consecutive":
        ids = list(range(1, total + 1))
    elif order == "strided":
        ids = list(range(1, 2 * total + 1, 2))
    else:
        ids = rng.sample(range(1, 2 * total + 1), total)
    num_slots = (max(ids) + 2) * block_size
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    k_cache = torch.randn(num_kv_heads, num_slots, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_kv_heads, num_slots, head_dim, generator=gen).to(dtype)
    k_cache[:, :block_size] = float("nan")
    v_cache[:, :block_size] = float("nan")
    tables, i = [], 0
    for c in counts:
        tables.append(ids[i : i + c])
        i += c
    return Paged(k_cache, v_cache, tables, block_size)


def dense_attention(q: torch.Tensor, paged: Paged, seq: int, positions: list[int], scale: float) -> torch.Tensor:
    """float64 softmax(q K^T) V of q [T, H, D] at positions, keys 0..position of sequence seq."""
    bs, table = paged.block_size, paged.tables[seq]
    num_keys = max(positions) + 1
    slots = [table[p // bs] * bs + p % bs for p in range(num_keys)]
    k = paged.k_cache[:, slots].double()  # [Hkv, L, D]
    v = paged.v_cache[:, slots].double()
    group = q.shape[1] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)  # [H, L, D]
    v = v.repeat_interleave(group, dim=0)
    scores = torch.einsum("thd,hld->htl", q.double(), k) * scale
    masked = torch.arange(num_keys).view(1, -1) > torch.tensor(positions).view(-1, 1)  # [T, L]
    scores = scores.masked_fill(masked, float("-inf"))
    return torch.einsum("htl,hld->thd", torch.softmax(scores, dim=-1), v)


def decode_inputs(paged: Paged, lens: list[int], num_heads: int, rng: random.Random):
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    q = torch.randn(len(lens), num_heads, paged.k_cache.shape[2], generator=gen).to(paged.k_cache.dtype)
    return q, paged.table_tensor(), torch.tensor(lens, dtype=torch.int32)


def prefill_inputs(paged: Paged, chunks: list[tuple[int, int]], num_heads: int, rng: random.Random):
    """chunks: (start_pos, num_tokens) per sequence."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    total = sum(n for _, n in chunks)
    q = torch.randn(total, num_heads, paged.k_cache.shape[2], generator=gen).to(paged.k_cache.dtype)
    starts = [0]
    for _, n in chunks:
        starts.append(starts[-1] + n)
    return (q, paged.table_tensor(), torch.tensor(starts, dtype=torch.int32),
            torch.tensor([p for p, _ in chunks], dtype=torch.int32))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


# ---- The reference against dense attention (always runs) ---------------------------------

@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,order", [
    (9, 3, 64, 16, "shuffled"), (8, 8, 32, 4, "strided"), (8, 2, 16, 1, "shuffled"), (4, 1, 8, 32, "consecutive"),
])
def test_reference_decode_matches_dense(num_heads, num_kv_heads, head_dim, block_size, order):
    rng = random.Random(num_heads * 1000 + block_size)
    lens = [1, 7, block_size + 1, 70]
    paged = make_paged(lens, num_kv_heads, head_dim, block_size, torch.float32, order, rng)
    q, tables, context_lens = decode_inputs(paged, lens, num_heads, rng)
    scale = head_dim**-0.5
    out = reference.paged_attention_decode(q, *paged.clean(), tables, context_lens, block_size, scale)
    for b, n in enumerate(lens):
        assert_close(out[b : b + 1], dense_attention(q[b : b + 1], paged, b, [n - 1], scale), torch.float32)


@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(9, 3, 16), (4, 4, 1), (8, 2, 32)])
def test_reference_prefill_matches_dense(num_heads, num_kv_heads, block_size):
    rng = random.Random(num_heads + block_size)
    chunks = [(0, 5), (37, 3), (0, 150), (129, 1)]  # (start_pos, tokens); 150 spans two query chunks
    lens = [p + n for p, n in chunks]
    paged = make_paged(lens, num_kv_heads, 32, block_size, torch.float32, "shuffled", rng)
    q, tables, query_start, start_pos = prefill_inputs(paged, chunks, num_heads, rng)
    out = reference.paged_attention_prefill(q, *paged.clean(), tables, query_start, start_pos, block_size, 0.2)
    for n, (first, count) in enumerate(chunks):
        rows = slice(query_start[n].item(), query_start[n + 1].item())
        expected = dense_attention(q[rows], paged, n, list(range(first, first + count)), 0.2)
        assert_close(out[rows], expected, torch.float32)


# ---- The compiled op against the reference ------------------------------------------------

@pytest.fixture(scope="module")
def ops():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PDSERVE_ATTENTION", raising=False)
        loaded = kernels.load()
    if loaded is None:
        pytest.skip("the compiled paged-attention op is unavailable here (not built and the build failed or was "
                    "forbidden; the reason is in pdserve.engine.kernels' log line)")
    return loaded


@pytest.fixture
def two_threads(ops):
    """The op with at least two torch threads, so that long contexts split into partitions."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield ops
    torch.set_num_threads(threads)


@pytest.fixture(params=["avx512", "avx2", "generic"])
def isa_ops(request, two_threads):
    """The op under each instruction set this CPU runs."""
    try:
        torch.ops.pdserve.select_isa(request.param)
    except RuntimeError:
        pytest.skip(f"this CPU does not run {request.param}")
    yield two_threads
    torch.ops.pdserve.select_isa("auto")


DECODE_CASES = [
    # num_heads, num_kv_heads, head_dim, block_size, lens, dtype, order
    (9, 3, 64, 16, [1, 15, 16, 17, 300, 1000], torch.float32, "consecutive"),
    (9, 3, 64, 16, [3, 700, 64], torch.bfloat16, "shuffled"),
    (8, 2, 128, 32, [33, 1, 500], torch.float32, "shuffled"),
    (12, 3, 72, 4, [9, 257, 2000], torch.bfloat16, "strided"),
    (8, 8, 32, 1, [1, 2, 90, 400], torch.float32, "shuffled"),
    (4, 4, 256, 16, [40, 600], torch.float16, "consecutive"),
    (16, 2, 8, 4, [5, 333], torch.float16, "shuffled"),
    (6, 1, 24, 32, [31, 32, 64, 1100], torch.float32, "strided"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,lens,dtype,order", DECODE_CASES)
def test_kernel_decode_matches_reference(isa_ops, num_heads, num_kv_heads, head_dim, block_size, lens, dtype, order):
    rng = random.Random(sum(lens) + head_dim)
    paged = make_paged(lens, num_kv_heads, head_dim, block_size, dtype, order, rng)
    q, tables, context_lens = decode_inputs(paged, lens, num_heads, rng)
    args = (tables, context_lens, block_size, 1 / math.sqrt(head_dim))
    out = isa_ops.paged_attention_decode(q, paged.k_cache, paged.v_cache, *args)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert_close(out, reference.paged_attention_decode(q, *paged.clean(), *args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_decode_long_context(two_threads, dtype):
    """8192 keys beside short rows: the long one splits into partitions, merged at the end."""
    rng = random.Random(8192)
    lens = [8192, 5, 300]
    paged = make_paged(lens, 3, 64, 16, dtype, "shuffled", rng)
    q, tables, context_lens = decode_inputs(paged, lens, 9, rng)
    args = (tables, context_lens, 16, 0.125)
    out = two_threads.paged_attention_decode(q, paged.k_cache, paged.v_cache, *args)
    assert_close(out, reference.paged_attention_decode(q, *paged.clean(), *args), dtype)


PREFILL_CASES = [
    # num_heads, num_kv_heads, head_dim, block_size, chunks (start_pos, tokens), dtype, order
    (9, 3, 64, 16, [(0, 200)], torch.float32, "consecutive"),
    (9, 3, 64, 16, [(0, 1), (48, 17), (100, 130), (0, 64)], torch.bfloat16, "shuffled"),
    (8, 2, 128, 32, [(31, 40), (0, 3)], torch.float32, "strided"),
    (12, 3, 72, 4, [(5, 90), (257, 1)], torch.float32, "shuffled"),
    (8, 8, 32, 1, [(0, 70), (20, 33)], torch.float16, "shuffled"),
    (16, 4, 16, 16, [(300, 20), (0, 0), (7, 9)], torch.float32, "consecutive"),
    (4, 1, 256, 32, [(64, 64)], torch.bfloat16, "consecutive"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,chunks,dtype,order", PREFILL_CASES)
def test_kernel_prefill_matches_reference(isa_ops, num_heads, num_kv_heads, head_dim, block_size, chunks, dtype,
                                          order):
    rng = random.Random(len(chunks) * 31 + head_dim)
    lens = [max(1, p + n) for p, n in chunks]
    paged = make_paged(lens, num_kv_heads, head_dim, block_size, dtype, order, rng)
    q, tables, query_start, start_pos = prefill_inputs(paged, chunks, num_heads, rng)
    args = (tables, query_start, start_pos, block_size, 1 / math.sqrt(head_dim))
    out = isa_ops.paged_attention_prefill(q, paged.k_cache, paged.v_cache, *args)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, reference.paged_attention_prefill(q, *paged.clean(), *args), dtype)


def test_kernel_prefill_long_chunk_with_prefix(two_threads):
    """A 1500-token chunk after a 600-token cached prefix: many tiles, uneven work per thread."""
    rng = random.Random(2100)
    paged = make_paged([2100, 40], 3, 64, 16, torch.float32, "consecutive", rng)
    q, tables, query_start, start_pos = prefill_inputs(paged, [(600, 1500), (0, 40)], 9, rng)
    args = (tables, query_start, start_pos, 16, 0.125)
    out = two_threads.paged_attention_prefill(q, paged.k_cache, paged.v_cache, *args)
    assert_close(out, reference.paged_attention_prefill(q, *paged.clean(), *args), torch.float32)


def test_kernel_reads_strided_queries(ops):
    """q may be a view (rows and heads strided) as long as each head's D values are contiguous."""
    rng = random.Random(5)
    paged = make_paged([50, 9], 2, 32, 8, torch.float32, "shuffled", rng)
    qkv = torch.randn(2, 12, 32)
    q = qkv[:, 2:10]  # [2, 8, 32], row stride 12 * 32
    args = (paged.table_tensor(), torch.tensor([50, 9], dtype=torch.int32), 8, 0.3)
    out = ops.paged_attention_decode(q, paged.k_cache, paged.v_cache, *args)
    assert_close(out, reference.paged_attention_decode(q, *paged.clean(), *args), torch.float32)


def test_kernel_rejects_bad_arguments(ops):
    rng = random.Random(6)
    paged = make_paged([20], 2, 16, 4, torch.float32, "consecutive", rng)
    q = torch.randn(1, 4, 16)
    tables = paged.table_tensor()
    with pytest.raises(RuntimeError, match="context_lens"):
        ops.paged_attention_decode(q, paged.k_cache, paged.v_cache, tables, torch.tensor([0], dtype=torch.int32),
                                   4, 1.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.paged_attention_decode(q, paged.k_cache, paged.v_cache, tables + 1000,
                                   torch.tensor([20], dtype=torch.int32), 4, 1.0)
    with pytest.raises(RuntimeError, match="block table"):
        ops.paged_attention_decode(q, paged.k_cache, paged.v_cache, tables, torch.tensor([21], dtype=torch.int32),
                                   4, 1.0)


def test_kernel_output_shape_traces_on_meta(ops):
    q = torch.empty(5, 9, 64, device="meta")
    cache = torch.empty(3, 160, 64, device="meta")
    table = torch.empty(2, 10, dtype=torch.int32, device="meta")
    ints = torch.empty(2, dtype=torch.int32, device="meta")
    assert ops.paged_attention_decode(q, cache, cache, table, ints, 16, 0.1).shape == (5, 9, 64)
    starts = torch.empty(3, dtype=torch.int32, device="meta")
    assert ops.paged_attention_prefill(q, cache, cache, table, starts, ints, 16, 0.1).shape == (5, 9, 64)


# ---- Choosing the op ----------------------------------------------------------------------

def test_env_forces_reference(monkeypatch, caplog):
    monkeypatch.setenv("PDSERVE_ATTENTION", "reference")
    with caplog.at_level("INFO", logger="pdserve.engine.kernels"):
        assert kernels.attention_ops() is None
    assert "PDSERVE_ATTENTION=reference" in caplog.text
    monkeypatch.delenv("PDSERVE_ATTENTION")


def test_build_failure_reports_the_compiler_error(tmp_path, monkeypatch, capsys):
    from pdserve.engine.kernels import build

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.cpp").write_text("int f() { return }\n")
    monkeypatch.setattr(build, "CSRC", csrc)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(build.BuildError, match="compiling broken.o failed") as failure:
        build.build()
    assert "error" in failure.value.stderr
    assert not build.library_path().exists()
    assert build.main([]) == 1
    assert "broken.cpp" in capsys.readouterr().err


def test_supports():
    assert kernels.supports(64, torch.bfloat16, torch.device("cpu"))
    assert kernels.supports(256, torch.float16, "cpu")
    assert kernels.supports(8, torch.float32, "cpu")
    assert not kernels.supports(64, torch.float32, torch.device("cuda"))
    assert not kernels.supports(60, torch.float32, "cpu")
    assert not kernels.supports(264, torch.float32, "cpu")
    assert not kernels.supports(64, torch.float64, "cpu")


def test_a_head_size_the_op_does_not_cover_falls_back_with_one_log_line(caplog):
    from pdserve.engine.attention import AttentionBackend
    from pdserve.engine.kv_cache import KVCache

    with caplog.at_level("INFO", logger="pdserve.engine.attention"):
        backend = AttentionBackend(KVCache(1, 2, 12, num_blocks=4, block_size=4, dtype=torch.float32, device="cpu"))
    assert backend.name == "reference"
    assert [r.getMessage() for r in caplog.records if "head_dim=12" in r.getMessage()]
