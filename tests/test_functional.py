"""The op ``local_attention_2d``: every backend against the reference, forward and every gradient; gradchecks;
bad input."""

from __future__ import annotations

import pytest
import torch

import sasa
import sasa.backends
from sasa import local_attention_2d
from sasa.backends import inductor

FAST_BACKENDS = [b for b in sasa.available_backends("cpu") if b != "reference"]

# (B, H, W, heads, head_dim, kernel_size): borders everywhere, maps smaller than the window, odd/non-square sizes
CASES = [
    (2, 5, 6, 2, 4, 3),
    (1, 7, 5, 3, 6, 5),
    (2, 8, 8, 2, 8, 7),
    (1, 3, 3, 2, 4, 7),  # 7x7 window on a 3x3 map
    (2, 4, 5, 1, 4, 7),  # 7x7 window on a 4x5 map
    (1, 9, 6, 2, 4, 9),
    (1, 1, 1, 1, 2, 3),  # a single pixel
]


def make_inputs(B, H, W, heads, d, K, *, per_head=False, dtype=torch.float32, seed=0, tables=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, W, heads, d, generator=g, dtype=dtype) for _ in range(3))
    shape = (heads, K, d // 2) if per_head else (K, d // 2)
    rows = torch.randn(*shape, generator=g, dtype=dtype) if tables else None
    cols = torch.randn(*shape, generator=g, dtype=dtype) if tables else None
    return q, k, v, rows, cols


def run(backend, q, k, v, rows, cols, K, padding, scale=1.0, grad_seed=1):
    """Forward + backward with a random upstream gradient; returns (out, grads in input order, None if absent).
    For ``inductor`` it also checks that both ran its compiled loops, not the eager fallback."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, v, rows, cols)]
    before = inductor.calls()
    out = local_attention_2d(*leaves, kernel_size=K, padding=padding, scale=scale, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    out.backward(g)
    if backend == "inductor":
        assert_compiled(before, "forward", "backward")
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def assert_compiled(before, *passes):
    """Since ``before`` (``inductor.calls()``), each of ``passes`` ran the compiled loops and nothing fell back."""
    after = inductor.calls()
    assert after["fallback"] == before["fallback"], f"inductor fell back to eager: {inductor.failure()}"
    for name in passes:
        assert after["compiled"][name] > before["compiled"][name], f"the compiled {name} did not run"


def assert_match(a, b, atol, rtol):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for name, ga, gb in zip(("q", "k", "v", "rel_rows", "rel_cols"), grads_a, grads_b):
        assert (ga is None) == (gb is None), name
        if ga is not None:
            torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("padding", ["zeros", "mask"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_backend_matches_reference(backend, case, padding, per_head):
    inputs = make_inputs(*case, per_head=per_head)
    K = case[-1]
    ref = run("reference", *inputs, K, padding, scale=0.8)
    got = run(backend, *inputs, K, padding, scale=0.8)
    assert_match(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("variant", ["no_key", "no_tables", "rows_only"])
def test_backend_optional_terms(backend, variant):
    q, k, v, rows, cols = make_inputs(2, 6, 5, 2, 4, 5)
    if variant == "no_key":
        k = None
    elif variant == "no_tables":
        rows = cols = None
    else:
        cols = None
    for padding in ("zeros", "mask"):
        assert_match(run(backend, q, k, v, rows, cols, 5, padding), run("reference", q, k, v, rows, cols, 5, padding),
                     atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_strided_views_of_fused_qkv(backend):
    """q, k, v as non-contiguous slices of one (B, H, W, 3, heads, d) tensor, as SelfAttention2d passes them."""
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(2, 6, 7, 3, 2, 8, generator=g)
    rows, cols = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    q, k, v = fused[:, :, :, 0], fused[:, :, :, 1], fused[:, :, :, 2]
    assert not q.is_contiguous()
    assert_match(run(backend, q, k, v, rows, cols, 7, "zeros"), run("reference", q, k, v, rows, cols, 7, "zeros"),
                 atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_float64_exact(backend):
    inputs = make_inputs(1, 5, 4, 2, 4, 7, per_head=True, dtype=torch.float64)
    assert_match(run(backend, *inputs, 7, "mask", 0.5), run("reference", *inputs, 7, "mask", 0.5),
                 atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_bfloat16_inputs(backend):
    """bf16 q / k / v / tables (what autocast hands a layer) are computed in fp32 inside: output and gradients
    come back in bf16 and match the fp32 reference to bf16 rounding."""
    inputs = [t.bfloat16() for t in make_inputs(2, 6, 5, 2, 8, 5)]
    out, grads = run(backend, *inputs, 5, "zeros")
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    want_out, want_grads = run("reference", *(t.float() for t in inputs), 5, "zeros")  # the same rounded inputs
    for got, want in zip([out, *grads], [want_out, *want_grads]):
        # measured: 0.1-0.6% of the largest value (the bf16 rounding of the results); 2% would be a real error
        assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("padding", ["zeros", "mask"])
def test_gradcheck_float64(backend, padding):
    q, k, v, rows, cols = make_inputs(1, 3, 4, 2, 4, 3, per_head=True, dtype=torch.float64, seed=5)
    leaves = [t.requires_grad_(True) for t in (q, k, v, rows, cols)]

    def fn(*args):
        return local_attention_2d(*args, kernel_size=3, padding=padding, scale=0.7, backend=backend)

    before = inductor.calls()
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)
    if backend == "inductor":
        assert_compiled(before, "forward", "backward")


@pytest.mark.parametrize("backend", sasa.available_backends("cpu"))
@pytest.mark.parametrize("case", [(1, 3, 3, 2, 4, 7), (2, 2, 3, 2, 4, 7), (1, 2, 2, 1, 4, 9), (2, 1, 1, 2, 2, 5),
                                  (1, 1, 2, 1, 2, 7)], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_mask_padding_clips_the_window_exactly(backend, case, per_head):
    """padding="mask" runs the window clipped to 2 * max(H, W) - 1 on maps smaller than it: same output and
    gradients (float64) as the full window through the reference, and zero gradient for the table rows cut off."""
    B, H, W, heads, d, K = case
    inputs = make_inputs(*case, per_head=per_head, dtype=torch.float64)
    got = run(backend, *inputs, K, "mask", scale=0.7)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    full = sasa.backends.get("reference").apply(*leaves, K, "mask", 0.7)  # no dispatcher: the full K x K window
    full.backward(torch.randn(full.shape, generator=torch.Generator().manual_seed(1), dtype=full.dtype))
    assert_match(got, (full.detach(), [t.grad for t in leaves]), atol=1e-12, rtol=1e-10)
    cut = (K - (2 * max(H, W) - 1)) // 2
    for grad in got[1][3:]:
        assert cut > 0 and grad[..., :cut, :].abs().max() == 0 and grad[..., K - cut:, :].abs().max() == 0


def test_reference_semantics_by_hand():
    """One pixel's output computed from the SPEC's formula with explicit loops, both padding modes."""
    q, k, v, rows, cols = make_inputs(1, 3, 4, 1, 4, 3, dtype=torch.float64, seed=7)
    for padding in ("zeros", "mask"):
        out = local_attention_2d(q, k, v, rows, cols, kernel_size=3, padding=padding, backend="reference")
        i, j = 0, 3  # a corner: 5 of 9 window positions fall outside
        logits, values = [], []
        for a in range(3):
            for b in range(3):
                y, x = i + a - 1, j + b - 1
                inside = 0 <= y < 3 and 0 <= x < 4
                if not inside and padding == "mask":
                    continue
                key = k[0, y, x, 0] if inside else torch.zeros(4, dtype=torch.float64)
                val = v[0, y, x, 0] if inside else torch.zeros(4, dtype=torch.float64)
                r = torch.cat((rows[a], cols[b]))
                logits.append(q[0, i, j, 0] @ (key + r))
                values.append(val)
        p = torch.softmax(torch.stack(logits), 0)
        expected = (p[:, None] * torch.stack(values)).sum(0)
        torch.testing.assert_close(out[0, i, j, 0], expected)


def test_relative_term_only_in_logits():
    """With v = 0 the output is 0 whatever the tables: the relative term never enters the values."""
    q, k, v, rows, cols = make_inputs(1, 4, 4, 1, 4, 3)
    out = local_attention_2d(q, k, torch.zeros_like(v), rows, cols, kernel_size=3, backend="reference")
    assert torch.count_nonzero(out) == 0


def test_default_backend_and_env_override(monkeypatch):
    q, k, v, rows, cols = make_inputs(1, 4, 4, 1, 4, 3)
    assert sasa.available_backends("cpu")[0] == "inductor"
    assert "inductor" not in sasa.available_backends("cuda")
    assert "reference" in sasa.available_backends("cpu")
    monkeypatch.setenv("SASA_BACKEND", "reference")
    ref = local_attention_2d(q, k, v, rows, cols, kernel_size=3)
    monkeypatch.setenv("SASA_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown"):
        local_attention_2d(q, k, v, rows, cols, kernel_size=3)
    monkeypatch.delenv("SASA_BACKEND")
    before = inductor.calls()
    torch.testing.assert_close(local_attention_2d(q, k, v, rows, cols, kernel_size=3), ref)
    assert_compiled(before, "forward")  # the default on CPU is the compiled backend, not its fallback


def test_inductor_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """No C++ compiler, an Inductor error: one warning, then the shifted backend's eager core (same results), and
    ``calls()`` says so (the other inductor tests assert on it)."""

    def broken(name):
        raise RuntimeError(f"no compiler for {name}")

    monkeypatch.setattr(inductor, "_compiled", broken)
    monkeypatch.setitem(inductor._STATE, "broken", None)
    monkeypatch.setattr(inductor, "_CALLS", {"compiled": {"forward": 0, "backward": 0},
                                             "fallback": {"forward": 0, "backward": 0}})
    inputs = make_inputs(2, 5, 4, 2, 4, 3)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    with pytest.warns(UserWarning, match="torch.compile failed for the inductor backend .*no compiler"):
        out = local_attention_2d(*leaves, kernel_size=3, padding="mask", backend="inductor")
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))  # run()'s gradient
    assert inductor.failure().startswith("RuntimeError")
    assert inductor.calls() == {"compiled": {"forward": 0, "backward": 0}, "fallback": {"forward": 1, "backward": 1}}
    with pytest.raises(AssertionError, match="inductor fell back to eager: RuntimeError"):  # what run() checks
        run("inductor", *inputs, 3, "mask")
    ref = run("shifted", *inputs, 3, "mask")
    assert_match((out.detach(), [t.grad for t in leaves]), ref, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ bad input
def _ok():
    return make_inputs(1, 4, 4, 2, 4, 3)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "rank 5"),
        (lambda a: a.update(k=a["k"][:, :3]), ValueError, "k must have the same shape"),
        (lambda a: a.update(v=a["v"][..., :2]), ValueError, "v must have the same shape"),
        (lambda a: a.update(q="q"), TypeError, "q must be a torch.Tensor"),
        (lambda a: a.update(kernel_size=4), ValueError, "kernel_size must be odd"),
        (lambda a: a.update(kernel_size=0), ValueError, "kernel_size must be odd"),
        (lambda a: a.update(kernel_size=-3), ValueError, "kernel_size must be odd"),
        (lambda a: a.update(kernel_size=3.0), TypeError, "kernel_size must be an int"),
        (lambda a: a.update(padding="reflect"), ValueError, "padding must be one of"),
        (lambda a: a.update(rel_rows=torch.randn(5, 2)), ValueError, "rel_rows must have shape"),
        (lambda a: a.update(rel_cols=torch.randn(3, 3, 2)), ValueError, "rel_cols must have shape"),
        (lambda a: a.update(backend="cuda-magic"), ValueError, "valid backends"),
        (lambda a: a.update(q=a["q"].double()), ValueError, "one device and dtype"),
        (lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), TypeError, "floating point"),
    ],
)
def test_bad_input(mutate, exc, match):
    q, k, v, rows, cols = _ok()
    args = dict(q=q, k=k, v=v, rel_rows=rows, rel_cols=cols, kernel_size=3)
    mutate(args)
    with pytest.raises(exc, match=match):
        local_attention_2d(**args)


def test_odd_head_dim_with_tables():
    q, k, v, _, _ = make_inputs(1, 4, 4, 2, 3, 3, tables=False)
    with pytest.raises(ValueError, match="head_dim must be even"):
        local_attention_2d(q, k, v, torch.randn(3, 1), torch.randn(3, 1), kernel_size=3)
    local_attention_2d(q, k, v, None, None, kernel_size=3)  # fine without tables


def test_backend_that_cannot_run_says_why():
    """Backends that exist but cannot run on CPU float64 (the fused GPU kernel) name the reason."""
    q, k, v, rows, cols = make_inputs(1, 4, 4, 1, 4, 3, dtype=torch.float64)
    names = set(sasa.backends.all_backends()) - set(sasa.available_backends("cpu", torch.float64))
    for name in names:
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run here: .+"):
            local_attention_2d(q, k, v, rows, cols, kernel_size=3, backend=name)


def test_shifted_compiles_without_graph_break():
    """``fullgraph=True`` fails on any graph break: the CPU backend is one opaque custom op forward and backward
    (aot_eager traces both without Inductor's compile time; the Triton backend has its own test)."""
    q, k, v, rows, cols = make_inputs(2, 5, 6, 2, 4, 3)
    leaves = [t.requires_grad_(True) for t in (q, k, v, rows, cols)]

    def f(q, k, v, rows, cols):
        return local_attention_2d(q, k, v, rows, cols, kernel_size=3, backend="shifted").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss, ref = compiled(*leaves), f(*leaves)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g, r)


def test_shifted_backward_memory():
    """Peak of forward + backward of the CPU backend, in units of its saved probabilities ``(B, h, k*k, H*P)``:
    3.2 today (probabilities, their gradient, the padded buffers); 4.2 when autograd zero-filled a gradient for
    the probabilities output of the custom op."""
    from sasa.bench.timing import peak_mb

    B, H, W, h, d, K = 2, 16, 16, 2, 8, 7
    q, k, v, rows, cols = (t.requires_grad_(True) for t in make_inputs(B, H, W, h, d, K))
    probs_mb = B * h * K * K * H * (W + K // 2) * 4 / 2**20

    def step():
        local_attention_2d(q, k, v, rows, cols, kernel_size=K, backend="shifted").sum().backward()

    step()
    assert peak_mb(step, torch.device("cpu")) < 3.7 * probs_mb
