"""Library loading, backends, buffers, zero-copy host memory, graph reuse, threads."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from ggml_test_ops import OpsBackend, OpsContext, wrap_device_host_memory

from tide_local import ggml
from tide_local.ggml import GGMLType as T

RNG = np.random.default_rng(99)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def cpu():
    backend = OpsBackend.cpu(n_threads=2)
    yield backend
    backend.free()


# --------------------------------------------------------------------------- loading


def test_library_loaded_and_abi_checked():
    L = ggml.lib()
    assert L.ggml_tensor_overhead() == ggml.GGML_TENSOR_SIZE + 32
    assert ggml.GGML_TENSOR_SIZE == 336
    info = ggml.library_info()
    assert info["version"]
    assert any(d["type"] == "cpu" for d in info["devices"])
    assert ggml.lib() is L  # loaded once


_ERROR_PROBE = textwrap.dedent(
    """
    import json, sys
    from tide_local.errors import GGMLLibraryError
    from tide_local import ggml
    try:
        ggml.row_size(ggml.GGMLType.Q8_0, 32)
    except GGMLLibraryError as e:
        print(json.dumps({"error": str(e)}))
    else:
        print(json.dumps({"error": None}))
    """
)


def _probe(lib_dir) -> str | None:
    env = dict(os.environ, TIDE_GGML_LIB_DIR=str(lib_dir))
    out = subprocess.run([sys.executable, "-c", _ERROR_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["error"]


def test_missing_library_gives_helpful_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _probe(empty)
    assert msg is not None and "\n" not in msg
    assert "libggml-base" in msg and "TIDE_GGML_LIB_DIR" in msg and str(empty) in msg

    msg = _probe(tmp_path / "does-not-exist")
    assert msg is not None and "does not exist" in msg and "TIDE_GGML_LIB_DIR" in msg

    broken = tmp_path / "broken"
    broken.mkdir()
    for stem in ("ggml-base", "ggml-cpu", "ggml"):
        (broken / f"lib{stem}.so").write_bytes(b"not a shared library")
    msg = _probe(broken)
    assert msg is not None and "cannot load" in msg and "\n" not in msg


def test_lib_dir_env_pointing_at_real_build_works():
    real = ggml.lib().lib_dir
    assert _probe(real) is None


# --------------------------------------------------------------------------- devices and backends


def test_devices_and_cpu_backend(cpu):
    devs = ggml.devices()
    cpu_devs = [d for d in devs if d.type == "cpu"]
    assert cpu_devs
    free, total = cpu_devs[0].memory()
    assert total > 0
    props = cpu_devs[0].props()
    assert props["name"] == cpu_devs[0].name and props["buffer_from_host_ptr"]
    assert cpu.is_cpu and cpu.n_threads == 2 and cpu.name == "CPU"
    assert cpu.buffer_type.is_host
    b2 = ggml.Backend.from_device(cpu_devs[0].name)
    assert b2.is_cpu and b2.ptr != cpu.ptr
    b2.n_threads = 1
    b2.free()
    with pytest.raises(ValueError):
        ggml.Backend.from_device("no-such-device")


def test_alloc_tensors_set_get_clear(cpu):
    ctx = ggml.Context(8)
    a = ctx.new_tensor(T.F32, shape=(3, 4), name="a")
    q = ctx.new_tensor(T.Q8_0, ne=(64, 2), name="q")
    buf = cpu.alloc_tensors(ctx, usage="weights")
    assert buf is not None and buf.size >= a.nbytes + q.nbytes and buf.is_host
    x = randn(3, 4)
    a.set(x)
    np.testing.assert_array_equal(a.get(), x)
    a.set(np.array([7.0, 8.0], np.float32), offset=4 * 4)  # partial write at a byte offset
    assert a.get()[1, 0] == 7.0 and a.get()[1, 1] == 8.0
    qb = ggml.quantize_rows(randn(2, 64), T.Q8_0)
    q.set(qb)
    np.testing.assert_array_equal(q.get(), qb)
    buf.clear(0)
    assert not a.get().any()
    with pytest.raises(ValueError, match="bytes"):
        a.set(randn(2, 4))
    with pytest.raises(ValueError, match="float32"):
        a.set(np.zeros((3, 4), np.int32))
    assert cpu.alloc_tensors(ctx) is None  # nothing left to allocate


def test_async_transfers(cpu):
    ctx = ggml.Context(4)
    a = ctx.new_tensor(T.F32, shape=(16,))
    cpu.alloc_tensors(ctx)
    x = randn(16)
    cpu.set_async(a, x)
    out = np.empty(16, np.float32)
    cpu.get_async(a, out)
    cpu.synchronize()
    np.testing.assert_array_equal(out, x)


def test_graph_reuse_with_new_inputs(cpu):
    ctx = ggml.Context(16)
    x = ctx.new_tensor(T.F32, shape=(4, 8), name="x", input=True)
    w = ctx.new_tensor(T.F32, shape=(3, 8), name="w", input=True)
    y = ctx.silu(ctx.mul_mat(w, x))
    graph = ctx.build_graph(y)
    cpu.check_graph(graph)
    wv = randn(3, 8)
    for _ in range(3):
        xv = randn(4, 8)
        cpu.compute(graph, {x: xv, w: wv})
        ref = xv @ wv.T
        np.testing.assert_allclose(y.get(), ref / (1 + np.exp(-ref)), rtol=1e-5, atol=1e-6)
    assert graph.n_nodes == 2 and graph.allocator.size > 0


def test_graph_allocator_reserve_and_shared(cpu):
    alloc = ggml.GraphAllocator(cpu)
    ctx = OpsContext(16)
    x = ctx.new_tensor(T.F32, shape=(64, 32), input=True)
    big = ctx.build_graph(ctx.scale(ctx.add(x, x), 2.0))
    alloc.reserve(big)
    size = alloc.size
    assert size >= 64 * 32 * 4
    graph = ctx.build_graph(ctx.scale(x, 3.0))
    alloc.alloc(graph)
    assert alloc.size == size  # fits in the reserved buffer
    xv = randn(64, 32)
    cpu.compute(graph, {x: xv})
    np.testing.assert_allclose(graph.outputs[0].get(), 3 * xv, rtol=1e-6)


# --------------------------------------------------------------------------- zero-copy host memory


def test_cpu_buffer_from_ptr_is_zero_copy(cpu):
    m, k, n = 16, 32, 3
    host = ggml.aligned_empty((m, k), np.float32)
    host[...] = randn(m, k)
    buf = ggml.wrap_host_memory(host)
    assert buf.base == host.ctypes.data and buf.size == host.nbytes

    wctx = ggml.Context(4)
    w = wctx.new_tensor(T.F32, shape=(m, k), name="w")
    buf.place(w, 0)
    assert w.data == host.ctypes.data
    del buf  # the weight context keeps the buffer (and the array) alive

    ctx = ggml.Context(8)
    x = ctx.new_tensor(T.F32, shape=(n, k), name="x", input=True)
    y = ctx.mul_mat(w, x)
    graph = ctx.build_graph(y)
    xv = randn(n, k)
    cpu.compute(graph, {x: xv})
    np.testing.assert_allclose(y.get(), xv @ host.T, rtol=1e-5, atol=1e-5)

    host[:] *= -2.0  # change the wrapped memory; the tensor sees it without any upload
    cpu.compute(graph)
    np.testing.assert_allclose(y.get(), xv @ host.T, rtol=1e-5, atol=1e-5)

    w.set(np.ones((m, k), np.float32))  # and writes through the tensor land in the array
    assert np.all(host == 1.0)


def test_mmapped_quantized_weights_at_offsets(cpu, tmp_path):
    """The GGUF use: quantized tensors read in place from an mmapped file at byte offsets."""
    k, m, n_exp = 256, 8, 4
    experts = randn(n_exp, m, k)
    data = ggml.quantize_rows(experts.reshape(-1, k), T.Q4_K)
    header = 4096  # tensor data starts on a page boundary after some header bytes
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(b"\0" * header)
        f.write(data.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = ggml.wrap_host_memory(mm)
    buf.set_usage("weights")
    wctx = ggml.Context(4)
    wt = wctx.new_tensor(T.Q4_K, ne=(k, m, n_exp), name="ffn_up_exps")
    buf.place(wt, header)
    assert buf.readonly
    with pytest.raises(ValueError, match="read-only"):
        wt.set(data)  # would crash the process on a read-only mapping
    with pytest.raises(ValueError, match="already has memory"):
        buf.place(wt, header)
    other = wctx.new_tensor(T.Q4_K, ne=(k, m, n_exp))
    with pytest.raises(ValueError, match="needs bytes"):
        buf.place(other, header + 1)

    ctx = ggml.Context(8)
    b = ctx.new_tensor(T.F32, ne=(k, 2, 3), input=True)
    ids = ctx.new_tensor(T.I32, ne=(2, 3), input=True)
    y = ctx.mul_mat_id(wt, b, ids)
    graph = ctx.build_graph(y)
    bv, idv = randn(3, 2, k), np.array([[0, 3], [1, 2], [3, 3]], np.int32)
    cpu.compute(graph, {b: bv, ids: idv})
    deq = ggml.dequantize_rows(data, T.Q4_K, k).reshape(n_exp, m, k)
    ref = np.stack([[deq[idv[t, s]] @ bv[t, s] for s in range(2)] for t in range(3)])
    assert np.linalg.norm(y.get() - ref) / np.linalg.norm(ref) < 1e-2


def test_wrap_rejects_misaligned():
    raw = ggml.aligned_empty(256, np.uint8)
    with pytest.raises(ValueError, match="aligned"):
        ggml.wrap_host_memory(raw[8:])
    with pytest.raises(ValueError, match="size"):
        ggml.wrap_host_memory(raw.ctypes.data)
    buf = ggml.wrap_host_memory(raw.ctypes.data, 128, keepalive=raw)
    assert buf.size == 128
    buf.free()
    assert repr(buf) == "Buffer(freed)"


def test_device_wrap_host_memory_on_cpu_device(cpu):
    host = ggml.aligned_empty((4, 8), np.float32)
    host[...] = randn(4, 8)
    buf = wrap_device_host_memory(cpu.device, host)
    ctx = ggml.Context(4)
    t = ctx.new_tensor(T.F32, shape=(4, 8))
    buf.place(t, 0)
    np.testing.assert_array_equal(t.get(), host)


def test_device_buffer_slots_via_place(cpu):
    """An expert slot pool: one buffer, tensors placed at slot offsets, uploads per slot."""
    k, m, n_slots = 64, 4, 3
    slot_bytes = ggml.row_size(T.Q8_0, k) * m
    pool = cpu.alloc_buffer(slot_bytes * n_slots)
    ctx = ggml.Context(8)
    stack = ctx.new_tensor(T.Q8_0, ne=(k, m, n_slots), name="slots")
    pool.place(stack, 0)
    experts = [ggml.quantize_rows(randn(m, k), T.Q8_0) for _ in range(n_slots)]
    for s in (2, 0, 1):
        stack.set(experts[s], offset=s * slot_bytes)
    np.testing.assert_array_equal(stack.get(), np.stack(experts))


# --------------------------------------------------------------------------- threads


def _matmul_graph(k=128, m=96, n=32):
    ctx = ggml.Context(8)
    w = ctx.new_tensor(T.F32, shape=(m, k), input=True)
    x = ctx.new_tensor(T.F32, shape=(n, k), input=True)
    y = ctx.mul_mat(w, x)
    return ctx, w, x, y, ctx.build_graph(y)


def test_two_cpu_backends_compute_concurrently_from_threads():
    backends = [ggml.Backend.cpu(1), ggml.Backend.cpu(1)]
    jobs = []
    for be in backends:
        ctx, w, x, y, graph = _matmul_graph()
        wv, xv = randn(96, 128), randn(32, 128)
        ggml.GraphAllocator(be).alloc(graph)
        jobs.append((be, graph, {w: wv, x: xv}, y, xv @ wv.T))
    errors = []

    def work(be, graph, feed, y, ref):
        try:
            for _ in range(20):
                be.compute(graph, feed)
                np.testing.assert_allclose(y.get(), ref, rtol=1e-4, atol=1e-4)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for be in backends:
        be.free()


def test_same_backend_from_two_threads_is_serialized(cpu):
    graphs = []
    for _ in range(2):
        ctx, w, x, y, graph = _matmul_graph()
        wv, xv = randn(96, 128), randn(32, 128)
        graphs.append((graph, {w: wv, x: xv}, y, xv @ wv.T))
    errors = []

    def work(graph, feed, y, ref):
        try:
            for _ in range(20):
                cpu.compute(graph, feed)
                np.testing.assert_allclose(y.get(), ref, rtol=1e-4, atol=1e-4)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=g) for g in graphs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --------------------------------------------------------------------------- logs


def test_log_modes():
    assert ggml.get_log_mode() == "python"
    ggml.set_log_mode("silent")
    assert ggml.get_log_mode() == "silent"
    ggml.set_log_mode("python")
    with pytest.raises(ValueError):
        ggml.set_log_mode("loud")


def test_large_graph_sized_automatically():
    """More nodes than ggml's default graph size (2048), across two contexts: no abort."""
    # one thread: 2500 tiny nodes are 2500 thread barriers, slow on a loaded 2-core machine
    cpu = ggml.Backend.cpu(1)
    a = ggml.Context(8)
    x = a.new_tensor(T.F32, shape=(4,), input=True)
    one = a.new_tensor(T.F32, shape=(4,), input=True)
    ctx = ggml.Context(3000)
    y = x
    for _ in range(2500):
        y = ctx.add(y, one)
    graph = ctx.build_graph(y)
    assert graph.n_nodes == 2500 and graph.size >= 2500
    del a  # ctx keeps the context of x and one alive
    cpu.compute(graph, {x: np.zeros(4, np.float32), one: np.ones(4, np.float32)})
    np.testing.assert_array_equal(y.get(), np.full(4, 2500, np.float32))


def test_events_unsupported_on_cpu_raise(cpu):
    if cpu.device.props()["events"]:
        pytest.skip("this CPU device supports events")
    with pytest.raises(ValueError, match="events"):
        ggml.Event(cpu.device)


def test_persistent_kv_cache_written_by_set_rows(cpu):
    """A cache tensor in its own buffer, written by one graph and read by the next."""
    d, n_cells = 8, 6
    cache_ctx = ggml.Context(2)
    cache = cache_ctx.new_tensor(T.F16, ne=(d, n_cells), name="k_cache")
    buf = cpu.alloc_tensors(cache_ctx)
    buf.clear(0)

    ctx = OpsContext(8)
    k = ctx.new_tensor(T.F32, ne=(d, 2), name="k", input=True)
    rows = ctx.new_tensor(T.I64, ne=(2,), name="rows", input=True)
    write = ctx.build_graph(ctx.set_rows(cache, k, rows))
    kv = randn(2, d)
    cpu.compute(write, {k: kv, rows: np.array([3, 5], np.int64)})

    rctx = ggml.Context(8)
    q = rctx.new_tensor(T.F32, ne=(d, 1), name="q", input=True)
    view = rctx.view(cache, (d, 3), offset=3 * cache.nb[1])  # cells 3..5
    scores = rctx.mul_mat(view, q)
    read = rctx.build_graph(scores)
    qv = randn(1, d)
    cpu.compute(read, {q: qv})
    expect_cache = np.zeros((n_cells, d), np.float16)
    expect_cache[[3, 5]] = kv.astype(np.float16)
    np.testing.assert_array_equal(cache.get(), expect_cache)
    ref = qv @ expect_cache[3:6].astype(np.float32).T
    np.testing.assert_allclose(scores.get(), ref, rtol=2e-3, atol=2e-3)
