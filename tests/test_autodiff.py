"""Reverse mode: every op's vector-Jacobian rule against central finite differences (float64, on the reference) and
against torch autograd (float32), through `m.vjp`; random op chains (hypothesis) the same way; the backward
function on the cpu and triton targets against the reference; clear errors where no rule exists yet."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from test_properties import random_modules

import sparsa
from sparsa.ir.core import OP_REGISTRY
from sparsa.ir.diagnostics import SparsaError

torch = pytest.importorskip("torch")
RECOMPUTE = "differentiate{residuals=recompute}"  # one backward function of the inputs (easier to drive here)
F = torch.nn.functional

# name -> (.sp body over x (and y), its torch transcription, extra inputs' shapes); x is [3, 4]
UNARY = ["abs", "relu", "exp", "sqrt", "rsqrt", "tanh", "sin", "cos", "sigmoid", "silu", "gelu", "gelu_tanh",
         "softplus", "log"]
TORCH_UNARY = {"abs": torch.abs, "relu": torch.relu, "exp": torch.exp, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
               "tanh": torch.tanh, "sin": torch.sin, "cos": torch.cos, "sigmoid": torch.sigmoid, "silu": F.silu,
               "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "softplus": F.softplus,
               "log": torch.log}
CASES = {
    **{f"unary {n}": (f"{n}(x)", TORCH_UNARY[n], {}) for n in UNARY},
    "neg": ("-x", lambda x: -x, {}),
    "add broadcast": ("x + y", lambda x, y: x + y, {"y": (4,)}),
    "sub broadcast": ("y - x", lambda x, y: y - x, {"y": (3, 1)}),
    "mul": ("x * y", lambda x, y: x * y, {"y": (3, 4)}),
    "div": ("x / y", lambda x, y: x / y, {"y": (1, 4)}),
    "pow": ("x ** y", lambda x, y: x ** y, {"y": (3, 4)}),
    "pow constant": ("x ** 3.0", lambda x: x ** 3.0, {}),
    "maximum": ("max(x, y)", torch.maximum, {"y": (3, 4)}),
    "minimum": ("min(x, y)", torch.minimum, {"y": (4,)}),
    "where": ("where(x > y, x * 2.0, y)", lambda x, y: torch.where(x > y, x * 2.0, y), {"y": (3, 4)}),
    "matmul": ("x @ y", lambda x, y: x @ y, {"y": (4, 5)}),
    "matmul vector": ("x @ y", lambda x, y: x @ y, {"y": (4,)}),
    "matmul batched": ("y @ x", lambda x, y: y @ x, {"y": (2, 5, 3)}),
    "sum": ("sum(x, axis=1)", lambda x: x.sum(1), {}),
    "sum keepdim": ("sum(x, axis=0, keepdim=true)", lambda x: x.sum(0, keepdim=True), {}),
    "mean": ("mean(x, axis=-1)", lambda x: x.mean(-1), {}),
    "max": ("max(x, axis=1)", lambda x: x.amax(1), {}),
    "min": ("min(x, axis=0, keepdim=true)", lambda x: x.amin(0, keepdim=True), {}),
    "logsumexp": ("logsumexp(x, axis=1)", lambda x: torch.logsumexp(x, 1), {}),
    "softmax": ("softmax(x, axis=-1)", lambda x: torch.softmax(x, -1), {}),
    "cumsum": ("cumsum(x, axis=1)", lambda x: torch.cumsum(x, 1), {}),
    "rmsnorm": ("rmsnorm(x, y)", lambda x, y: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * y,
                {"y": (4,)}),
    "layernorm": ("layernorm(x, y, y * 0.5)", lambda x, y: F.layer_norm(x, (4,), y, y * 0.5, 1e-5), {"y": (4,)}),
    "transpose": ("transpose(x, [1, 0]) @ y", lambda x, y: x.T @ y, {"y": (3, 2)}),
    "reshape": ("reshape(x, [2, 6])", lambda x: x.reshape(2, 6), {}),
    "slice": ("x[1:3, :2]", lambda x: x[1:3, :2], {}),
    "slice steps": ("x[0:3:2, 1::2]", lambda x: x[0:3:2, 1::2], {}),
    "slice negative steps": ("x[::-1, 3:0:-2]", lambda x: x.flip(0)[:, [3, 1]], {}),
    "slice negative steps from the end": ("x[-2::-1, -1::-3]", lambda x: x[[1, 0]][:, [3, 0]], {}),
    "concat": ("concat([x, y], axis=0)", lambda x, y: torch.cat([x, y], 0), {"y": (2, 4)}),
    "gather rows": ("x[y]", lambda x, y: x[y], {"y": "i64:5"}),
    "gather elements": ("x[y, z]", lambda x, y, z: x[y, z], {"y": "i64:6", "z": "i64:6"}),
    "topk values": ("a, b = topk(x, k=2)\n    return a * 3.0", lambda x: torch.topk(x, 2).values * 3.0, {}),
    "scan": ("scan(x, y, axis=1)", lambda x, y: _torch_scan(x, y, None), {"y": (3, 4)}),
    "scan h0": ("scan(x, y, axis=1, h0=z)", lambda x, y, z: _torch_scan(x, y, z), {"y": (3, 4), "z": (3,)}),
    "split": ("a, b = split(x, [1, 3], axis=1)\n    return b * a", lambda x: torch.split(x, [1, 3], 1)[1]
              * torch.split(x, [1, 3], 1)[0], {}),
}


INDICES = {"gather rows": [[0, 2, 2, -1, 1]], "gather elements": [[0, 2, 1, 2, -3, 0], [3, 0, -1, 3, 1, 3]]}


def _torch_scan(a, b, h0):
    h = torch.zeros(a.shape[0], dtype=a.dtype) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def _source(body: str, extra: dict, dtype: str) -> str:
    args = "".join(f", {n}: {s.split(':')[0]}[{s.split(':')[1]}]" if isinstance(s, str)
                   else f", {n}: {dtype}[{', '.join(map(str, s))}]" for n, s in extra.items())
    body = body if "return" in body else f"return {body}"
    return f"model M(x: {dtype}[3, 4]{args}) -> ANY {{\n    {body}\n}}"


def _compile(body: str, extra: dict, dtype: str, target: str = "reference") -> sparsa.CompiledModel:
    """The case as a model; its result type is read off the frontend's error for a wrong one."""
    import re

    probe = _source(body, extra, dtype).replace("-> ANY", f"-> {dtype}[1]")
    try:
        return sparsa.compile(probe, target=target)
    except SparsaError as e:
        got = re.search(r"got (\w+\[[^\]]*\])", str(e))
        assert got, str(e)
        return sparsa.compile(probe.replace(f"-> {dtype}[1]", f"-> {got.group(1)}"), target=target)


def _inputs(name: str, extra: dict, dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    if name in INDICES:  # places (repeated, and negative ones counted from the end)
        return [rng.standard_normal((3, 4)).astype(dtype)] + [np.array(i, np.int64) for i in INDICES[name]]
    xs = [rng.standard_normal((3, 4))] + [rng.standard_normal(s) for s in extra.values()]
    if name in ("unary sqrt", "unary rsqrt", "unary log", "pow", "pow constant", "scan", "scan h0"):
        xs[0] = np.abs(xs[0]) + 0.5  # in the domain
    if name == "div":
        xs[1] = np.sign(xs[1]) * (np.abs(xs[1]) + 0.5)
    return [x.astype(dtype) for x in xs]


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_against_finite_differences(name: str) -> None:
    """float64 on the reference (the case's IR with every f32 made f64): <dy, J e_i> by central differences
    equals the i-th component of the backward function's result."""
    from sparsa.backends.reference import run_function
    from sparsa.ir import parse_module, print_module
    from sparsa.passes import PassManager
    from sparsa.runtime.compiler import grad_pipeline

    body, _, extra = CASES[name]
    text = print_module(_compile(body, extra, "f32").module)
    module = parse_module(text.replace("xf32>", "xf64>").replace("tensor<f32>", "tensor<f64>"))
    grad = PassManager(grad_pipeline("canonicalize,cse,dce").replace("differentiate", RECOMPUTE)).run(module)
    fwd, back = (f.attributes["sym_name"] for f in grad.funcs)
    xs = _inputs(name, extra, np.float64)
    (y,) = run_function(grad, xs, func=fwd)
    dy = np.random.default_rng(7).standard_normal(np.shape(y))
    grads = run_function(grad, [*xs, dy], func=back)
    eps = 1e-6
    floats = [k for k, x in enumerate(xs) if x.dtype.kind == "f"]
    assert len(grads) == len(floats)
    for k, x in ((k, xs[k]) for k in floats):
        want = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            plus, minus = [a.copy() for a in xs], [a.copy() for a in xs]
            plus[k][i] += eps
            minus[k][i] -= eps
            diff = run_function(grad, plus, func=fwd)[0] - run_function(grad, minus, func=fwd)[0]
            want[i] = np.sum(diff * dy) / (2 * eps)
        np.testing.assert_allclose(grads[floats.index(k)], want, rtol=1e-6, atol=1e-6, err_msg=f"{name}: input {k}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_against_torch_autograd(name: str) -> None:
    """float32: the pullback equals torch autograd's gradients (ties and kinks broken as PyTorch breaks them)."""
    body, fn, extra = CASES[name]
    m = _compile(body, extra, "f32")
    xs = _inputs(name, extra, np.float32)
    y, pullback = m.vjp(*xs)
    dy = np.random.default_rng(7).standard_normal(np.shape(y)).astype(np.float32)
    grads = pullback(dy)
    ts = [torch.tensor(x, requires_grad=x.dtype.kind == "f") for x in xs]
    out = fn(*ts)
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-5, atol=1e-5)
    out.backward(torch.tensor(dy))
    assert list(grads) == [n for n, t in zip(m.input_names, ts, strict=True) if t.requires_grad]
    for n, t in zip(m.input_names, ts, strict=True):
        if t.requires_grad:
            np.testing.assert_allclose(grads[n], t.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{name}: d{n}")


def test_every_tensor_op_with_float_results_has_a_rule_or_is_listed() -> None:
    """Which ops reverse mode covers: every tensor-dialect op with float results, except the ones listed here with
    what they wait for. (tensor.pullback needs none: expand-pullbacks replaces it by rules before differentiate.)"""
    waiting: dict[str, str] = {}
    missing = sorted(n for n, c in OP_REGISTRY.items() if n.startswith("tensor.") and not hasattr(c, "vjp")
                     and n not in waiting and n not in ("tensor.constant", "tensor.iota", "tensor.not", "tensor.and",
                                                         "tensor.or", "tensor.cmp", "tensor.pullback"))
    assert not missing, f"tensor ops without a vjp rule: {missing}"


@settings(max_examples=40, deadline=None)
@given(random_modules())
def test_random_chains_against_torch(drawn) -> None:
    """Random chains of ops (test_properties' generator): the backward function equals torch autograd of the same
    chain transcribed op by op into torch (float64)."""
    from sparsa.ir import print_module
    from sparsa.passes import PassManager
    from sparsa.runtime.compiler import grad_pipeline

    module, _ = drawn
    f = module.funcs[-1]
    grad = PassManager(grad_pipeline("canonicalize,cse,dce").replace("differentiate", RECOMPUTE)).run(module)
    back = grad.funcs[-1]
    assert back.attributes["residuals"] == "recompute", print_module(grad)
    from sparsa.backends.reference import run_function

    rng = np.random.default_rng(0)
    shapes = [tuple(3 if not isinstance(d, int) else d for d in a.type.shape) for a in f.regions[0].block.args]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ys = run_function(grad, xs, func=f.attributes["sym_name"])
    dys = [rng.standard_normal(np.shape(y)).astype(np.float32) for y in ys]
    got = run_function(grad, [*xs, *dys], func=back.attributes["sym_name"])
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    pairs = [(o, torch.tensor(d, dtype=torch.float64)) for o, d in zip(_torch_run(f, ts), dys, strict=True)
             if o.requires_grad]  # an output of constants alone has nothing to flow back
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [d for _, d in pairs])
    for g, t in zip(got, ts, strict=True):
        want = t.grad.numpy() if t.grad is not None else np.zeros(t.shape)  # nothing reached it
        np.testing.assert_allclose(g, want, rtol=2e-3, atol=2e-3)


def _torch_run(f, ts):
    """f's ops run in torch (float64), one op at a time, by their NumPy semantics' torch counterparts."""
    env = {id(a): t for a, t in zip(f.regions[0].block.args, ts, strict=True)}
    unary = {"tensor.neg": torch.neg, "tensor.abs": torch.abs, "tensor.relu": torch.relu, "tensor.exp": torch.exp,
             "tensor.log": torch.log, "tensor.sqrt": torch.sqrt, "tensor.rsqrt": torch.rsqrt, "tensor.tanh": torch.tanh,
             "tensor.sin": torch.sin, "tensor.cos": torch.cos, "tensor.sigmoid": torch.sigmoid, "tensor.silu": F.silu,
             "tensor.gelu": F.gelu, "tensor.gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
             "tensor.softplus": F.softplus}
    binary = {"tensor.add": torch.add, "tensor.sub": torch.sub, "tensor.mul": torch.mul, "tensor.div": torch.div,
              "tensor.maximum": torch.maximum, "tensor.minimum": torch.minimum, "tensor.pow": torch.pow}
    for op in f.regions[0].block.ops:
        args = [env[id(v)] for v in op.operands]
        a = op.attributes
        if op.NAME == "func.return":
            return args
        if op.NAME == "tensor.constant":
            out = torch.full([3 if not isinstance(d, int) else d for d in op.result.type.shape], a["value"],
                             dtype=torch.float64)
        elif op.NAME in unary:
            out = unary[op.NAME](args[0])
        elif op.NAME in binary:
            out = binary[op.NAME](*args)
        elif op.NAME == "tensor.cmp":
            out = {"lt": torch.lt, "gt": torch.gt, "le": torch.le, "ge": torch.ge, "eq": torch.eq,
                   "ne": torch.ne}[a["pred"]](*args)
        elif op.NAME == "tensor.where":
            out = torch.where(*args)
        elif op.NAME in ("tensor.sum", "tensor.mean", "tensor.max", "tensor.min"):
            fn = {"tensor.sum": torch.sum, "tensor.mean": torch.mean, "tensor.max": torch.amax,
                  "tensor.min": torch.amin}[op.NAME]
            out = fn(args[0], dim=list(a["axes"]), keepdim=a.get("keepdim", False))
        elif op.NAME == "tensor.softmax":
            out = torch.softmax(args[0], a["axis"])
        elif op.NAME == "tensor.transpose":
            out = args[0].permute(*a["perm"])
        else:
            raise AssertionError(f"no torch transcription of {op.NAME}")
        env[id(op.results[0])] = out
    raise AssertionError("no return")


SYMBOLIC_AXIS = {  # .sp and torch of slices and concats along an axis of symbolic length L
    "slices": ("""model S(x: f32[B, L], y: f32[B, 3]) -> f32[B, 1] {
    a = sum(exp(x[:, 1::2]), axis=1, keepdim=true) * mean(x[:, 0:-1:2], axis=1, keepdim=true)
    return a + sum(x[:, -3:] * x[:, -3:], axis=1, keepdim=true) + sum(x[:, 2:-1:3], axis=1, keepdim=true)
}""", lambda x, y: (x[:, 1::2].exp().sum(1, keepdim=True) * x[:, 0:-1:2].mean(1, keepdim=True)
                   + (x[:, -3:] ** 2).sum(1, keepdim=True) + x[:, 2:-1:3].sum(1, keepdim=True))),
    "reversed": ("""model R(x: f32[B, L], y: f32[B, 3]) -> f32[B, 1] {
    return sum(cumsum(x[:, -1::-1], axis=1) * x + exp(x[:, ::-1]) * x, axis=1, keepdim=true)
}""", lambda x, y: (x.flip(1).cumsum(1) * x + x.flip(1).exp() * x).sum(1, keepdim=True)),
    "concats": ("""model C(x: f32[B, L], y: f32[B, 3]) -> f32[B, 1] {
    c = concat([y, exp(x), y[:, :2], y[:, :0]], axis=1)
    return sum(c * c, axis=1, keepdim=true) + sum(sigmoid(concat([x * 2.0, y], axis=1)), axis=1, keepdim=true)
}""", lambda x, y: ((torch.cat([y, x.exp(), y[:, :2], y[:, :0]], 1) ** 2).sum(1, keepdim=True)
                   + torch.sigmoid(torch.cat([x * 2, y], 1)).sum(1, keepdim=True))),
}


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("case", sorted(SYMBOLIC_AXIS))
def test_slices_and_concats_of_a_symbolic_axis_differentiate(target: str, case: str) -> None:
    """Slices of an axis of symbolic length L (its last rows, every other row, short of the end) put dY back
    where they took it, and a concat of pieces one of which is L long hands each its slice of dY (from the nearer
    end), at each L, odd or even: the gradients equal torch autograd's."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    src, fn = SYMBOLIC_AXIS[case]
    m = sparsa.compile(src, target=target)
    for L in (4, 7, 10):
        rng = np.random.default_rng(L)
        x, y = rng.standard_normal((2, L)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
        dy = rng.standard_normal((2, 1)).astype(np.float32)
        xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(y).requires_grad_(True)
        yt_out = fn(xt, yt)
        yt_out.backward(torch.from_numpy(dy))
        out, pullback = m.vjp(x, y)
        np.testing.assert_allclose(np.asarray(out), yt_out.detach().numpy(), rtol=1e-5, atol=1e-5)
        got = pullback(dy)
        for name, t in (("x", xt), ("y", yt)):
            want = t.grad.numpy() if t.grad is not None else np.zeros_like(t.detach().numpy())  # (y: unread)
            np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-4, atol=1e-4,
                                       err_msg=f"d{name}, L={L}")


STARTS_AT_SIZES = """model Q(x: f32[B, L], y: f32[B, K]) -> f32[B, 1] {
    a = sum(exp(x[:, K:]), axis=1, keepdim=true) + sum(x[:, K:L], axis=1, keepdim=true)
    return a + sum(y, axis=1, keepdim=true)
}"""


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
def test_slices_starting_at_a_size_run_and_differentiate_on_every_target(target: str) -> None:
    """x[:, K:] with K the rows of another input (a symbolic start: an offset from the axis's beginning, step 1):
    the forward and every gradient equal torch's at K < L, K = L (empty: a sum over nothing is 0, on triton too)
    and K = 1; the backward is handed what binds K (it reads nothing of y). K > L is a RuntimeShapeError on each
    target, not a slice PyTorch's indexing clamps."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton":
        pytest.importorskip("triton")
    m = sparsa.compile(STARTS_AT_SIZES, target=target)
    assert "starts = [0, {K}]" in m.ir()
    for L, K in ((7, 3), (9, 9), (5, 1)):
        rng = np.random.default_rng(L + K)
        x, y = rng.standard_normal((2, L)).astype(np.float32), rng.standard_normal((2, K)).astype(np.float32)
        xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(y).requires_grad_(True)
        want = xt[:, K:].exp().sum(1, keepdim=True) + xt[:, K:L].sum(1, keepdim=True) + yt.sum(1, keepdim=True)
        dy = rng.standard_normal((2, 1)).astype(np.float32)
        want.backward(torch.from_numpy(dy))
        out, pullback = m.vjp(x, y)
        np.testing.assert_allclose(np.asarray(out), want.detach().numpy(), rtol=1e-5, atol=1e-5)
        got = pullback(dy)
        for name, t in (("x", xt), ("y", yt)):
            np.testing.assert_allclose(np.asarray(got[name]), t.grad.numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"d{name}, L={L}, K={K}")
    with pytest.raises(SparsaError, match="bounds do not lie inside the axis"):
        m(np.ones((2, 3), np.float32), np.ones((2, 5), np.float32))


def test_a_slice_starting_at_a_size_takes_step_one() -> None:
    with pytest.raises(SparsaError, match=r"(?s)2:22: error: a slice starting at a size \(\{K\}\) takes step 1.*\^"):
        sparsa.compile(STARTS_AT_SIZES.replace("x[:, K:]", "x[:, K::2]"), target="reference")


@pytest.mark.parametrize("target", ["cpu", "triton"])
def test_backward_on_native_targets(target: str) -> None:
    """A small MLP's backward function compiled for the target equals the reference's."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    src = """model MLP(x: f32[T, 8]) -> f32[T, 4] {
    param w1: f32[8, 16]
    param b1: f32[16]
    param w2: f32[16, 4]
    param g: f32[4]
    return rmsnorm(gelu_tanh(x @ w1 + b1) @ w2, g)
}"""
    ref = sparsa.compile(src, target="reference").init_weights(3)
    native = sparsa.compile(src, target=target).init_weights(3)
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    want = ref.vjp(x)[1](dy)
    got = native.vjp(x)[1](dy)
    assert list(got) == ["x", "w1", "b1", "w2", "g"]
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-4, atol=2e-4, err_msg=f"{target}: d{k}")
    # an embedding read at repeated places and a top-k: their backward adds at those places (scatter-add)
    src = """model E(tok: i64[T]) -> f32[T, 2] {
    param emb: f32[16, 8]
    param w: f32[8, 6]
    v, i = topk(tanh(emb[tok] @ w), k=2)
    return v
}"""
    tok = np.array([3, 3, 0, 15, 3, 7], np.int64)
    dv = np.random.default_rng(2).standard_normal((6, 2)).astype(np.float32)
    want = sparsa.compile(src, target="reference").init_weights(1).vjp(tok)[1](dv)
    got = sparsa.compile(src, target=target).init_weights(1).vjp(tok)[1](dv)
    assert list(got) == ["emb", "w"]
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-4, atol=2e-4, err_msg=f"{target}: d{k}")


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
def test_a_weight_nothing_reads_gets_zeros(target: str) -> None:
    """A declared weight the model never reads (dead code, gone before `differentiate`) still has its entry in the
    pullback's dict, of zeros; the backward records the names of the gradients it returns."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton":
        pytest.importorskip("triton")
    m = sparsa.compile("model M(x: f32[4]) -> f32[4] {\n    param unused: f32[3, 2]\n    param u: f32[2]\n"
                       "    return x * u[1]\n}\n", target=target)
    m.load_weights({"unused": np.ones((3, 2), np.float32), "u": np.array([5.0, 2.0], np.float32)})
    x = np.arange(4, dtype=np.float32)
    grads = m.vjp(x)[1](np.ones(4, np.float32))
    assert list(grads) == ["x", "unused", "u"]
    np.testing.assert_array_equal(grads["unused"], np.zeros((3, 2), np.float32))
    np.testing.assert_allclose(grads["x"], np.full(4, 2.0))
    np.testing.assert_allclose(grads["u"], [0.0, 6.0])
    assert 'grads = ["x", "u"]' in m.ir(grad=True)


def test_ir_cli_and_errors(tmp_path) -> None:
    """`m.ir(grad=True)` and `sparsa compile --grad` show the backward function; ops without a rule name
    themselves and their line; a pullback with the wrong number of cotangents says so."""
    from sparsa.runtime.cli import main

    src = tmp_path / "m.sp"
    src.write_text("model M(x: f32[T, 4]) -> f32[T, 4] {\n    param w: f32[4, 4]\n    return tanh(x @ w)\n}\n")
    m = sparsa.compile(str(src), target="reference").init_weights(0)
    text = m.ir(grad=True)
    assert "func.func @M_fwd(%x: tensor<{T}x4xf32>) -> (tensor<{T}x4xf32>, " in text
    assert 'func.func @M_bwd(' in text and 'attributes {residuals = "saved"}' in text
    out = tmp_path / "grad.sir"
    assert main(["compile", str(src), "--grad", "--target", "reference", "-o", str(out)]) == 0
    assert "@M_bwd" in out.read_text()
    _, pullback = m.vjp(np.ones((2, 4), np.float32))
    with pytest.raises(SparsaError, match="one cotangent per output"):
        pullback()
    from pathlib import Path

    from sparsa.ir import parse_module
    from sparsa.passes import PassManager

    sparse = sparsa.compile(str(Path(__file__).parent.parent / "examples" / "sparse_ffn.sp"), target="reference")
    with pytest.raises(SparsaError, match="'sparse.nm_matmul' has no derivative yet") as e:  # packed too early
        PassManager("lower-sparse-weights,differentiate").run(parse_module(sparse.ir("input")))
    assert "sparse_ffn.sp:6" in str(e.value)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_sparse_weights_get_gradients_on_their_pattern_only(target: str) -> None:
    """sparse_ffn.sp: dx as the dense product's; dW = x^T dy kept on the stored blocks of the #bsr weight (an empty
    block gets none, a zero inside a stored block does) and on the kept entries of the 2:4 weight."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    from pathlib import Path

    rng = np.random.default_rng(4)
    blocks = rng.random((32, 128)) < 0.2
    blocks[0, 0], blocks[0, 1] = False, True
    up = rng.standard_normal((1024, 4096)).astype(np.float32) * np.kron(blocks, np.ones((32, 32), np.float32))
    up[3, 40] = 0.0  # inside the stored block (0, 1)
    groups = rng.standard_normal((1024, 4, 1024)).astype(np.float32)
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, np.argsort(rng.random(groups.shape), axis=1)[:, :2], True, axis=1)
    down = (groups * keep).reshape(4096, 1024)
    m = sparsa.compile(str(Path(__file__).parent.parent / "examples" / "sparse_ffn.sp"), target=target)
    m.load_weights({"w_up": up, "w_down": down})
    x, dy = (rng.standard_normal((6, 1024)).astype(np.float32) for _ in range(2))
    grads = m.vjp(x)[1](dy)
    tx, tu, td = (torch.tensor(a, requires_grad=True) for a in (x, up, down))
    (torch.relu(tx @ tu) @ td).backward(torch.tensor(dy))
    stored = np.kron(blocks, np.ones((32, 32))).astype(bool)
    want = {"x": tx.grad.numpy(), "w_up": np.where(stored, tu.grad.numpy(), 0.0),
            "w_down": np.where(down != 0, td.grad.numpy(), 0.0)}
    for n, w in want.items():
        np.testing.assert_allclose(grads[n], w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=f"d{n}")
    assert (grads["w_up"][:32, :32] == 0).all() and grads["w_up"][3, 40] != 0


def _selective_scan(u, delta, A, Bs, C, D):
    dA = torch.exp(delta[..., None] * A)
    dBu = (delta * u)[..., None] * Bs[:, :, None, :]
    h, hs = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=u.dtype), []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        hs.append(h)
    return (torch.stack(hs, 1) * C[:, :, None, :]).sum(-1) + D * u


def _hand_attention(q, k, v):
    S = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * 0.125
    s = s.masked_fill(~torch.tril(torch.ones(S, S, dtype=torch.bool)), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize(("example", "shapes", "fn"), [
    ("selective_scan.sp", [(2, 7, 5), (2, 7, 5), (5, 4), (2, 7, 4), (2, 7, 4), (5,)], _selective_scan),
    ("unfused_attention.sp", [(1, 2, 9, 64)] * 3, _hand_attention),
])
def test_shared_examples_against_autograd(example: str, shapes: list, fn, target: str) -> None:
    """The shared examples reverse mode covers so far: their pullback against an autograd transcription (the
    scan's backward is the transposed scan, on every target)."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    from pathlib import Path

    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if example == "selective_scan.sp":  # a step size > 0, a decay < 0 (Mamba's)
        xs[1], xs[2] = np.abs(xs[1]) * 0.3 + 0.05, -np.abs(xs[2]) - 0.5
    m = sparsa.compile(str(Path(__file__).parent.parent / "examples" / example), target=target)
    y, pullback = m.vjp(*xs)
    dy = rng.standard_normal(np.shape(y)).astype(np.float32)
    grads = pullback(dy)
    ts = [torch.tensor(x, requires_grad=True) for x in xs]
    out = fn(*ts)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-4, atol=1e-5)
    for n, t in zip(m.input_names, ts, strict=True):
        np.testing.assert_allclose(grads[n], t.grad.numpy(), rtol=1e-3, atol=1e-4, err_msg=f"{example}: d{n}")


MOE = """const D = 16
const F = 24
const E = 4
model M(x: f32[T, D]) -> f32[T, D] {{
    param gate: f32[D, E]
    param w1: f32[E, D, F]
    param w3: f32[E, D, F]
    param w2: f32[E, F, D]
    weights, experts = topk(softmax(x @ gate, axis=-1), k={k})
    {renorm}
    return moe(x, experts, weights{capacity}) |e, h| {{
        (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]
    }}
}}"""


def _moe_source(k: int, renorm: bool, capacity: float | None) -> str:
    return MOE.format(k=k, renorm="weights = weights / sum(weights, axis=-1, keepdim=true)" if renorm else "",
                      capacity="" if capacity is None else f", capacity={capacity}")


def _torch_moe(x, W, k, renorm, capacity, router="gate", ffn=None):
    """The layer written out token by token: top-k of the softmax, capacity counted by hand (token then slot
    order), each kept assignment's expert output (`ffn(h, e)`, default SwiGLU of w1, w3, w2) weighted into its
    token."""
    if ffn is None:
        def ffn(h, ex):
            return (F.silu(h @ W["w1"][ex]) * (h @ W["w3"][ex])) @ W["w2"][ex]
    probs = torch.softmax(x @ W[router], -1)
    w, e = torch.topk(probs, k)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    T, E = x.shape[0], W[router].shape[1]
    cap = T * k if capacity is None else int(np.ceil(capacity * T * k / E))
    seen = [0] * E
    out = []
    for t in range(T):
        y = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(k):
            ex = int(e[t, j])
            seen[ex] += 1
            if seen[ex] > cap:
                continue
            y = y + w[t, j] * ffn(x[t:t + 1], ex)[0]
        out.append(y)
    return torch.stack(out)


def _torch_rmsnorm(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def _torch_decoder(tokens, W):
    """tiny_moe_decoder.sp written out: embedding, four layers of sliding-window (128) attention and a Mixtral MoE
    with RMSNorm and residuals, the tied head."""
    B, S = tokens.shape
    x = W["embed"][tokens]
    i = torch.arange(S)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 128)
    for n in range(4):
        p = f"Layer.{n}."
        h = _torch_rmsnorm(x, W[p + "attn_norm"])
        q, k, v = (h @ W[p + "Attention.0.wqkv"]).reshape(B, S, 12, 64).transpose(1, 2).split(4, dim=1)
        s = (q @ k.transpose(-1, -2) * 0.125).masked_fill(~allowed, float("-inf"))
        o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, S, 256)
        x = x + o @ W[p + "Attention.0.wo"]
        h = _torch_rmsnorm(x, W[p + "ffn_norm"]).reshape(B * S, 256)
        moe = {name: W[p + "MoE.0." + name] for name in ("gate", "w1", "w3", "w2")}
        x = x + _torch_moe(h, moe, 2, True, None).reshape(B, S, 256)
    return _torch_rmsnorm(x, W["final_norm"]) @ W["embed"].T


def _switch(W):
    return lambda h, ex: torch.relu(h @ W["wi"][ex]) @ W["wo"][ex]


# the decoder on cpu is test_cpu_training's (against the reference's pullback, at three token counts)
@pytest.mark.parametrize(("example", "target"), [
    ("mixtral_moe.sp", "reference"), ("mixtral_moe.sp", "cpu"), ("switch_capacity.sp", "reference"),
    ("switch_capacity.sp", "cpu"), ("tiny_moe_decoder.sp", "reference")])
def test_moe_examples_against_autograd(example: str, target: str) -> None:
    """The shared MoE examples' pullbacks, every weight's gradient and the input's, against torch autograd of the
    example written out token by token (the Switch layer's capacity of 1.25 dropping tokens, the decoder's four
    layers of attention and MoE with its tied embedding)."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    from pathlib import Path

    m = sparsa.compile(str(Path(__file__).parent.parent / "examples" / example), target=target).init_weights(3)
    rng = np.random.default_rng(6)
    W = {n: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True) for n, v in m.weights.items()}
    if example == "tiny_moe_decoder.sp":
        x = rng.integers(0, 1024, (1, 11)).astype(np.int32)
        out = _torch_decoder(torch.tensor(x, dtype=torch.int64), W)
    else:
        x = rng.standard_normal((19, 512 if example == "mixtral_moe.sp" else 256)).astype(np.float32)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        out = _torch_moe(xt, W, 2, True, None) if example == "mixtral_moe.sp" else \
            _torch_moe(xt, W, 1, False, 1.25, router="router", ffn=_switch(W))
    dy = rng.standard_normal(tuple(out.shape)).astype(np.float32)
    y, pullback = m.vjp(x)
    grads = pullback(dy)
    out.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-4, atol=1e-4 * float(out.detach().abs().max()))
    want = {n: t.grad.numpy() for n, t in W.items()}
    if example != "tiny_moe_decoder.sp":
        want["x"] = xt.grad.numpy()
    assert set(grads) == set(want)
    for n, w in want.items():  # float32 sums of many terms: within a share of the gradient's largest entry
        np.testing.assert_allclose(grads[n], w, rtol=1e-3, atol=1e-4 * (np.abs(w).max() + 1e-6), err_msg=f"d{n}")


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
@pytest.mark.parametrize(("k", "renorm", "capacity"), [(2, True, None), (1, False, 0.75), (3, True, 0.6)])
def test_moe_layer_against_autograd(k: int, renorm: bool, capacity: float | None, target: str) -> None:
    """The MoE layer's pullback (the dispatch reused, grouped GEMMs with transposed weights, X_seg^T dY_seg per
    expert, gates through the combine, the router through the picked scores; dropped assignments get nothing)
    against torch autograd of the layer written token by token."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    m = sparsa.compile(_moe_source(k, renorm, capacity), target=target).init_weights(k)
    x = np.random.default_rng(k).standard_normal((21, 16)).astype(np.float32)
    dy = np.random.default_rng(9).standard_normal((21, 16)).astype(np.float32)
    y, pullback = m.vjp(x)
    grads = pullback(dy)
    W = {n: torch.tensor(v, requires_grad=True) for n, v in m.weights.items()}
    xt = torch.tensor(x, requires_grad=True)
    out = _torch_moe(xt, W, k, renorm, capacity)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(np.asarray(y), out.detach().numpy(), rtol=1e-4, atol=1e-5)
    want = {"x": xt.grad, **{n: t.grad for n, t in W.items()}}
    assert list(grads) == list(want)
    for n, t in want.items():
        np.testing.assert_allclose(np.asarray(grads[n]), t.numpy(), rtol=1e-3, atol=2e-5, err_msg=f"{target}: d{n}")
    ir = m.ir(grad=True)
    assert "moe.grouped_weight_grad" in ir and "moe.moe" not in ir  # never densified


def test_moe_layer_against_finite_differences() -> None:
    """float64 on the reference: the MoE layer's backward function against central differences, for x and each
    weight (a sample of entries), with capacity dropping assignments."""
    from sparsa.backends.reference import run_function
    from sparsa.ir import parse_module
    from sparsa.passes import PassManager
    from sparsa.runtime.compiler import grad_pipeline
    from sparsa.runtime.weights import init_weights, weight_specs

    m = sparsa.compile(_moe_source(2, True, 0.75), target="reference")
    text = m.ir("input")
    module = parse_module(text.replace("xf32>", "xf64>").replace("tensor<f32>", "tensor<f64>"))
    params = {n: a.astype(np.float64) for n, a in init_weights(weight_specs(module), 4).items()}
    grad = PassManager(grad_pipeline(m.backend.PIPELINE).replace("differentiate", RECOMPUTE)).run(module)
    fwd, back = (f.attributes["sym_name"] for f in grad.funcs)
    x = np.random.default_rng(4).standard_normal((9, 16))
    dy = np.random.default_rng(5).standard_normal((9, 16))
    got = dict(zip(["x", *params], run_function(grad, [x, dy], params, func=back), strict=True))
    rng = np.random.default_rng(6)
    eps = 1e-6
    for name in got:
        base = x if name == "x" else params[name]
        for i in [tuple(rng.integers(0, n) for n in base.shape) for _ in range(6)]:
            plus, minus = base.copy(), base.copy()
            plus[i] += eps
            minus[i] -= eps

            def f(v, name=name):
                inputs, weights = ([v], params) if name == "x" else ([x], {**params, name: v})
                return run_function(grad, inputs, weights, func=fwd)[0]
            want = np.sum((f(plus) - f(minus)) * dy) / (2 * eps)
            np.testing.assert_allclose(got[name][i], want, rtol=1e-5, atol=1e-7, err_msg=f"d{name}{i}")


@pytest.mark.parametrize("example", ["mixtral_moe.sp", "selective_scan.sp", "sliding_window_attention.sp"])
def test_saved_and_recomputed_residuals_agree(example: str) -> None:
    """`@M_fwd` + `@M_bwd` (residuals saved, the default) and `@M_vjp` (recomputed) give the same gradients; the
    saved forward returns the model's outputs first and no weight among its residuals."""
    from pathlib import Path

    from sparsa.backends.reference import run_function
    from sparsa.ir import parse_module
    from sparsa.passes import PassManager
    from sparsa.runtime.compiler import grad_pipeline

    m = sparsa.compile(str(Path(__file__).parent.parent / "examples" / example), target="reference").init_weights(0)
    pipe = grad_pipeline(m.backend.PIPELINE)
    saved = PassManager(pipe).run(parse_module(m.ir("input")))
    recompute = PassManager(pipe.replace("differentiate", RECOMPUTE)).run(parse_module(m.ir("input")))
    assert [f.attributes["sym_name"].rsplit("_", 1)[-1] for f in saved.funcs[1:]] == ["fwd", "bwd"]
    assert recompute.funcs[-1].attributes["residuals"] == "recompute"
    assert not any(op.NAME == "func.param" and any(u.op.NAME == "func.return" for u in op.result.uses)
                   for op in saved.funcs[1].walk())
    rng = np.random.default_rng(0)
    f = saved.funcs[0]
    xs = [rng.standard_normal(tuple(3 if not isinstance(d, int) else d for d in a.type.shape)).astype(np.float32)
          for a in f.regions[0].block.args]
    if example == "selective_scan.sp":
        xs[1], xs[2] = np.abs(xs[1]) * 0.3, -np.abs(xs[2])
    both = run_function(saved, xs, m.weights, func=saved.funcs[1].attributes["sym_name"])
    (y,) = run_function(saved, xs, m.weights, func=f.attributes["sym_name"])
    np.testing.assert_allclose(both[0], y, rtol=1e-5, atol=1e-6)  # (the model's scan is fused, the saved one not)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    a = run_function(saved, [*both[1:], dy], m.weights, func=saved.funcs[2].attributes["sym_name"])
    b = run_function(recompute, [*xs, dy], m.weights, func=recompute.funcs[-1].attributes["sym_name"])
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("freezing", [False, True])
def test_swapped_moe_block_trains_with_sparsas_backward(freezing: bool) -> None:
    """transformers' Mixtral block swapped for a Sparsa block: loss.backward() runs Sparsa's pullback, and the
    hidden states' and every parameter's gradient equal eager autograd's."""
    pytest.importorskip("torch_mlir")
    pytest.importorskip("transformers")
    import copy

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from sparsa.runtime.torch_moe import _SparsaMoE, swap_moe_blocks

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    holder = torch.nn.Sequential(copy.deepcopy(block))
    assert swap_moe_blocks(holder, "cpu", freezing=freezing) == ["0"]
    x = torch.randn(2, 10, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = holder(x)
    nodes, seen = [out.grad_fn], []
    while nodes:  # the autograd graph: Sparsa's function is in it
        node = nodes.pop()
        seen.append(node.name())
        nodes += [n for n, _ in node.next_functions if n is not None]
    assert any(name.startswith(_SparsaMoE.__name__) for name in seen), seen
    (out * out).sum().backward()
    ref = block(x_ref)
    ref = ref[0] if isinstance(ref, tuple) else ref
    (ref * ref).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(holder[0].named_parameters(), block.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_torch_compile_training_backward_graphs_do_not_fall_back(target: str) -> None:
    """loss.backward() under torch.compile(backend=sparsa): AOTAutograd's backward graph holds ATen's
    *_backward ops, imported as the op classes' own rules; nothing falls back and every gradient equals eager."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    from sparsa.runtime.torch_backend import SparsaBackend

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 6)

        def forward(self, x):
            h = F.silu(self.a(x))
            h = torch.tanh(self.b(h)) + F.gelu(h) + F.gelu(h, approximate="tanh") + torch.relu(h) * torch.sigmoid(h)
            return torch.softmax(self.c(h), -1)

    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    backend = SparsaBackend({"target": target})
    x = torch.randn(5, 8)
    (torch.compile(net, backend=backend)(x) ** 2).sum().backward()
    (ref(x) ** 2).sum().backward()
    assert not backend.fallbacks, dict(backend.fallbacks)
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_pullback_wrt_values_computed_from_each_other_is_refused() -> None:
    """The cotangents a pullback gives are of values the ops between read; one wrt value made from another (the
    matmul's product and its operand) is an error naming the op, not a silently partial derivative."""
    from sparsa.ir import parse_module
    from sparsa.ir.diagnostics import SparsaError
    from sparsa.passes import PassManager

    module = parse_module("""module {
  func.func @pb(%x: tensor<4x3xf32>, %w: tensor<3x5xf32>, %dy: tensor<4x5xf32>) -> (tensor<4x3xf32>, tensor<4x5xf32>) {
    %m = tensor.matmul(%x, %w) : (tensor<4x3xf32>, tensor<3x5xf32>) -> tensor<4x5xf32>
    %y = tensor.tanh(%m) : (tensor<4x5xf32>) -> tensor<4x5xf32>
    %dx, %dm = tensor.pullback(%y, %dy, %x, %m) : (tensor<4x5xf32>, tensor<4x5xf32>, tensor<4x3xf32>, tensor<4x5xf32>) -> (tensor<4x3xf32>, tensor<4x5xf32>)
    func.return(%dx, %dm) : (tensor<4x3xf32>, tensor<4x5xf32>) -> ()
  }
}
""")
    with pytest.raises(SparsaError, match="a wrt value is computed from another one"):
        PassManager("expand-pullbacks").run(module)


def test_no_grad_inputs_and_views_of_inputs_made_again_in_the_backward() -> None:
    """A function's `no_grad` leaves those inputs' gradients (and the GEMMs only they need) out, the others equal;
    views of inputs (a weight's slice and transposes) are not residuals: the backward takes the input and views it
    again."""
    from sparsa.backends import base as backends
    from sparsa.runtime.compiler import CompiledModel, compile_source

    source = """
model Experts(x: f32[T, 8], idx: i64[T, 2], w: f32[T, 2], gu: f32[3, 12, 8], down: f32[3, 8, 6]) -> f32[T, 8] {
    return moe(x, idx, w) |e, h| { (silu(h @ gu[e][:6].T) * (h @ gu[e][6:].T)) @ down[e].T }
}
"""
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((5, 8)).astype(np.float32), rng.integers(0, 3, (5, 2)),
            rng.random((5, 2)).astype(np.float32), rng.standard_normal((3, 12, 8)).astype(np.float32),
            rng.standard_normal((3, 8, 6)).astype(np.float32)]
    dy = rng.standard_normal((5, 8)).astype(np.float32)
    got = {}
    for no_grad in ([], [0], [0, 3]):
        module, name = compile_source(source, "<test>", None)
        module.funcs[-1].attributes["no_grad"] = no_grad
        backend = backends.get("reference")
        m = CompiledModel(module, name, backend, backend.PIPELINE)
        got[tuple(no_grad)] = m.vjp(*args)[1](dy)
        grad = m._backward().module
        fwd, bwd = grad.funcs[-2], grad.funcs[-1]
        saved = [v.defining_op.NAME for v in fwd.regions[0].block.terminator.operands[1:] if v.defining_op]
        assert not [n for n in saved if n in ("tensor.slice", "tensor.transpose")], saved
        assert sorted(a.name_hint for a in bwd.regions[0].block.args if a.name_hint in ("gu", "down")) == ["down", "gu"]
        assert sum(op.NAME == "moe.grouped_matmul" for op in bwd.walk()) == 1 + 2 * (0 not in no_grad)
    assert list(got[()]) == ["x", "w", "gu", "down"] and list(got[(0,)]) == ["w", "gu", "down"]
    assert list(got[(0, 3)]) == ["w", "down"]
    for key in ((0,), (0, 3)):
        for n, g in got[key].items():
            np.testing.assert_allclose(g, got[()][n], rtol=1e-5, atol=1e-6, err_msg=f"{key}: {n}")
