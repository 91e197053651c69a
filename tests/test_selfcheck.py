"""The Triton kernels' self-check (``sasa/backends/selfcheck.py``): one check per configuration and process, a
failed configuration warns once and runs ``shifted``, ``SASA_KERNEL_CHECK=error`` raises and ``=off`` skips.

On CPU the kernels run in Triton's interpreter, so the checks run there too; a configuration is broken on purpose
by patching the interpreted kernel module's host functions (``forward`` / ``backward``), which both the check and
the call use. Shapes are tiny: the check's input is then the call's own size."""

import importlib.util
import warnings

import pytest
import torch

import sasa
from sasa.backends import selfcheck

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    """Interpreted kernels for CPU tensors, the default check mode, and no verdicts before or after the test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SASA_KERNEL_CHECK", raising=False)
    from sasa.backends import triton_backend

    selfcheck.clear()
    yield triton_backend
    selfcheck.clear()


def _kernels(triton_backend, module="triton_kernels"):
    return triton_backend.kernels_for(torch.device("cpu"), module)


def _window_inputs(shape=(1, 3, 4, 1, 8), K=3, dtype=torch.float32, channels_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, W, heads, d = shape
    if channels_first:  # (B, heads, d, H, W) storage seen as (B, H, W, heads, d): channel stride H*W
        q, k, v = (torch.randn(B, heads, d, H, W, generator=g).to(dtype).permute(0, 3, 4, 1, 2).requires_grad_()
                   for _ in range(3))
    else:
        q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    rows, cols = (torch.randn(K, d // 2, generator=g).requires_grad_() for _ in range(2))
    return q, k, v, rows, cols


def _window(backend, inputs, K=3, padding="zeros"):
    out = sasa.local_attention_2d(*inputs, kernel_size=K, padding=padding, scale=0.5, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, *torch.autograd.grad(out, inputs, dout))


def _count_checks(monkeypatch, triton_backend, name="_window_check"):
    calls = []
    real = getattr(triton_backend, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_backend, name, counted)
    return calls


def test_correct_kernels_pass_once(interpret, monkeypatch):
    """The first call of a configuration checks it (forward and backward, reference gradients computed from inside
    the custom op); later calls, and a call under no_grad of the same configuration, do not. (Another configuration
    gets its own verdict: ``test_stem_checked_once``.)"""
    calls = _count_checks(monkeypatch, interpret)
    inputs = _window_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _window("triton", inputs)
        second = _window("triton", inputs)
        with torch.no_grad():
            sasa.local_attention_2d(*inputs, kernel_size=3, scale=0.5, backend="triton")
    assert len(calls) == 1
    (key, verdict), = selfcheck.verdicts().items()
    assert verdict is None and dict(key)["op"] == "window" and dict(key)["head_dim"] == 8
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_check_leaves_rng_and_modes_alone(interpret):
    """The check draws from its own generator and runs in its own thread: the program's random stream is where it
    was, and a first call under inference mode still checks (with gradients) and passes."""
    inputs = [t.detach() for t in _window_inputs()]
    state = torch.get_rng_state()
    with torch.inference_mode():
        sasa.local_attention_2d(*inputs, kernel_size=3, backend="triton")
    assert torch.equal(torch.get_rng_state(), state)
    assert list(selfcheck.verdicts().values()) == [None]


def _break(monkeypatch, triton_backend, which):
    """Make the interpreted window kernels wrong: the forward's output or the backward's dq."""
    kernels = _kernels(triton_backend)
    real = getattr(kernels, which)

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        return (result[0] * 1.5 + 0.25, *result[1:])

    monkeypatch.setattr(kernels, which, broken)


@pytest.mark.parametrize("channels_first", [False, True], ids=["channels_last", "channels_first"])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_broken_configuration_warns_once_and_runs_shifted(interpret, monkeypatch, which, channels_first):
    _break(monkeypatch, interpret, which)
    inputs = _window_inputs(channels_first=channels_first)
    expected = _window("shifted", inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _window("triton", inputs)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning), [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "op=window" in message and "head_dim=8" in message and "dtype=float32" in message
    assert ("out differs" if which == "forward" else "dq differs") in message and "shifted" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = _window("triton", inputs)
    assert not caught
    for got in (first, second):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_error_mode_raises(interpret, monkeypatch):
    _break(monkeypatch, interpret, "forward")
    monkeypatch.setenv("SASA_KERNEL_CHECK", "error")
    for _ in range(2):  # every call of the failed configuration, not only the first
        with pytest.raises(selfcheck.KernelCheckError, match="op=window.*head_dim=8.*out differs"):
            _window("triton", _window_inputs())


def test_off_mode_skips(interpret, monkeypatch):
    """``off``: no check at all, so even a wrong kernel runs (what the check exists to prevent)."""
    calls = _count_checks(monkeypatch, interpret)
    _break(monkeypatch, interpret, "forward")
    monkeypatch.setenv("SASA_KERNEL_CHECK", "off")
    inputs = _window_inputs()
    out = _window("triton", inputs)[0]
    assert not calls and not selfcheck.verdicts()
    assert not torch.allclose(out, _window("shifted", inputs)[0])


def test_invalid_mode_names_the_variable(interpret, monkeypatch):
    monkeypatch.setenv("SASA_KERNEL_CHECK", "loud")
    with pytest.raises(ValueError, match="SASA_KERNEL_CHECK='loud'.*'off', 'warn', 'error'"):
        _window("triton", _window_inputs())


@pytest.mark.parametrize("case", ["qr_only_mask_per_head", pytest.param("fused_d12_hb2", marks=pytest.mark.slow),
                                  "channels_first_k5"])
def test_check_passes_on_layouts(interpret, monkeypatch, case):
    """The check reproduces the call's configuration on its small input (tiles, heads per program, vector width)
    for strided views, odd head_dim, several heads per program and channels-first q: every verdict passes."""
    g = torch.Generator().manual_seed(0)
    if case == "qr_only_mask_per_head":
        q, v = (torch.randn(1, 5, 6, 2, 8, generator=g).requires_grad_() for _ in range(2))
        k, rows, cols = None, torch.randn(2, 3, 4, generator=g).requires_grad_(), None
        call = dict(kernel_size=3, padding="mask")
    elif case == "fused_d12_hb2":
        monkeypatch.setattr(_kernels(interpret), "HEADS_OVERRIDE", 2)
        monkeypatch.setattr(_kernels(interpret), "TILE_OVERRIDE", (2, 4))
        q, k, v = torch.randn(1, 3, 5, 3, 2, 12, generator=g).requires_grad_().unbind(3)
        rows, cols = (torch.randn(3, 6, generator=g).requires_grad_() for _ in range(2))
        call = dict(kernel_size=3)
    else:
        q, k, v, rows, cols = _window_inputs(shape=(1, 4, 5, 1, 8), K=5, channels_first=True)
        call = dict(kernel_size=5)
    out = sasa.local_attention_2d(q, k, v, rows, cols, backend="triton", **call)
    out.square().sum().backward()
    (key, verdict), = selfcheck.verdicts().items()
    assert verdict is None, (selfcheck.describe(key), verdict)
    if case == "fused_d12_hb2":
        assert dict(key)["tile_fwd"][3] == 2
    if case == "channels_first_k5":
        assert dict(key)["vec"] == 1


@pytest.mark.slow
def test_compiled_graph_checks_at_run_time(interpret):
    """Under torch.compile the custom op's body runs the check at the graph's first run (tracing never does), with
    no graph break."""
    q, k, v, rows, cols = _window_inputs()

    def f(q, k, v, rows, cols):
        return sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=3, backend="triton").square().sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, rows, cols)
    grads = torch.autograd.grad(loss, [q, k, v, rows, cols])
    assert list(selfcheck.verdicts().values()) == [None]
    ref = torch.autograd.grad(f(q, k, v, rows, cols), [q, k, v, rows, cols])
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------ attention stem kernels


def _stem(backend, x, g, pm, wv, block=2):
    from sasa.functional import stem_attention

    out = stem_attention(x, g, pm, wv, block=block, backend=backend)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, *torch.autograd.grad(out, [x, g, pm, wv], dout))


def _stem_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, 4, 6, generator=gen).requires_grad_(), torch.randn(3, 6, generator=gen).requires_grad_(),
            torch.randn(4, 2, generator=gen).requires_grad_(), torch.randn(2, 6, 4, generator=gen).requires_grad_())


def test_stem_checked_once(interpret, monkeypatch):
    """One check per stem configuration; a second configuration (NHWC input) gets its own."""
    calls = _count_checks(monkeypatch, interpret, "_stem_check")
    inputs = _stem_inputs()
    for _ in range(2):
        _stem("triton", *inputs)
    assert len(calls) == 1
    (key, verdict), = selfcheck.verdicts().items()
    assert verdict is None and dict(key)["op"] == "stem" and dict(key)["block"] == 2
    x = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _stem("triton", x, *inputs[1:])
    assert len(calls) == 2 and list(selfcheck.verdicts().values()) == [None, None]


def test_stem_broken_configuration_runs_shifted(interpret, monkeypatch):
    kernels = _kernels(interpret, "triton_stem_kernels")
    real = kernels.backward
    monkeypatch.setattr(kernels, "backward", lambda *a: (real(*a)[0] * 2, *real(*a)[1:]))
    inputs = _stem_inputs()
    expected = _stem("shifted", *inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [_stem("triton", *inputs) for _ in range(2)]
    assert len(caught) == 1 and "op=stem" in str(caught[0].message) and "dx differs" in str(caught[0].message)
    for run in got:
        for a, b in zip(run, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_pass_their_check(monkeypatch):
    """On a GPU, the configurations the paper's models train with (bf16 fused q / k / v views, fp32 tables, k=7,
    head_dim 8..64, both paddings; the stem under bf16 autocast) pass their self-check; ``error`` mode, so a
    failure raises naming the configuration rather than silently running ``shifted``."""
    from sasa.layers.stem import AttentionStem

    monkeypatch.setenv("SASA_KERNEL_CHECK", "error")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    selfcheck.clear()
    g = torch.Generator().manual_seed(0)
    for d in (8, 16, 32, 64):
        for padding in ("zeros", "mask"):
            qkv = torch.randn(2, 14, 14, 3, 8, d, generator=g).to("cuda", torch.bfloat16).requires_grad_()
            rows, cols = (torch.randn(7, d // 2, generator=g).cuda().requires_grad_() for _ in range(2))
            out = sasa.local_attention_2d(*qkv.unbind(3), rows, cols, kernel_size=7, padding=padding,
                                          backend="triton")
            out.float().square().sum().backward()
    stem = AttentionStem(3, 64, heads=4, backend="triton").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = stem(torch.randn(2, 3, 32, 32, generator=g).cuda().requires_grad_())
    out.float().sum().backward()
    found = selfcheck.verdicts()
    assert len(found) == 9 and all(v is None for v in found.values()), found
    selfcheck.clear()
