"""The adapted linear against the reference math in fp64: same outputs and gradients with
dropout on (same mask) and off; U's gradient from LayerNorm, GELU and attention saves instead of
a kept x; U·x shared within a model call; GQT as one node; coverage per backbone family;
torch.compile; the merged path (W + s·ΔW without dropout) against the unmerged one."""

import collections
import weakref
from functools import partial

import pytest
import torch
from torch import nn

from aurora_ds.aurora import layer as layer_mod, once
from aurora_ds.aurora.layer import AuroraFactors, AuroraLinear


def reference(layer: AuroraLinear, x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """The layer as first written: two einsums, dropout on u, a separate scaled add."""
    U, up = layer.source.down.U, layer.target.up
    a, b, rank = layer.a, layer.b, layer.target.rank
    u = x.unflatten(-1, (a, U.shape[1])) @ U.t()
    if mask is not None:
        u = u * mask.view(u.shape) / (1 - p)
    m = torch.einsum("pqt,tk->kpq", up.core, layer.coeffs).reshape(b, a, rank, rank)
    delta = (torch.einsum("...ip,jipq->...jq", u, m) @ up.V.t()).flatten(-2)
    return layer.base_layer(x) + layer.scale * delta


def _layer(d_in, d_out, a, b, rank=3, dropout=0.0, scale=1.0, seed=0):
    torch.manual_seed(seed)
    kw = {"dtype": torch.float64}
    source = AuroraFactors(d_in, rank, dropout, **kw)
    target = source if d_in == d_out else AuroraFactors(d_out, rank, dropout, **kw)
    layer = AuroraLinear(nn.Linear(a * d_in, b * d_out, **kw).requires_grad_(False), source, target, scale)
    with torch.no_grad():
        for p in (source.down.U, target.up.V, target.up.core, layer.coeffs):
            p.copy_(torch.randn_like(p))
    return layer


def _grads(layer, out, x):
    params = [x, layer.source.down.U, layer.target.up.V, layer.target.up.core, layer.coeffs]
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(), params)


def _node_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    return names


BLOCKS = [(6, 6, 1, 1), (6, 6, 1, 3), (6, 6, 4, 1), (6, 6, 1, 4), (5, 7, 1, 1)]


@pytest.mark.parametrize("d_in,d_out,a,b", BLOCKS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(2, 5), (7,)])
def test_matches_reference_in_fp64(monkeypatch, d_in, d_out, a, b, dropout, shape):
    layer = _layer(d_in, d_out, a, b, dropout=dropout, scale=0.7).train()
    masks = []
    native_dropout = torch.native_dropout

    def record(*args):
        out, kept = native_dropout(*args)
        masks.append(kept)
        return out, kept

    monkeypatch.setattr(torch, "native_dropout", record)
    x = torch.randn(*shape, a * d_in, dtype=torch.float64, requires_grad=True)
    got = layer(x)
    assert "CopySlices" not in _node_names(got), "the update was written into a view"
    assert len(masks) == (dropout > 0) and all(m.dtype == torch.bool for m in masks)
    want = reference(layer, x, masks[0] if masks else None, dropout)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(layer, got, x), _grads(layer, want, x)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_eval_mode_has_no_dropout_and_merge_agrees():
    layer = _layer(6, 6, 1, 3, dropout=0.5).eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, reference(layer, x, None, 0.0))
        layer.merge()
        torch.testing.assert_close(layer(x), out)


@pytest.mark.slow
def test_torch_compile_matches_eager_in_one_graph():
    """A whole adapted BLIP step under torch.compile: one graph (no breaks, so no per-layer
    frames to recompile for each block shape), the same loss and gradients as eager, its
    readers run as one (learnt and laid out by two eager calls), traced as one call of the
    model as engine.compile traces it."""
    from torch._dynamo.utils import counters

    from aurora_ds import AuroraConfig, build_backbone, inject_aurora
    from aurora_ds.aurora import as_one_call
    from aurora_ds.backbones import example_batch, forward_features, get_spec

    name = "blip-tiny-retrieval"
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_backbone(name)
    handle = inject_aurora(model, AuroraConfig(rank=4, backbone=name, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in handle.named_aurora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    batch = example_batch(spec, 2)
    params = [p for _, p in handle.named_trainable_parameters()]

    def loss_fn():
        return sum(o.float().pow(2).mean() for o in forward_features(model, spec, batch).values())

    loss_fn().backward()  # as engine.compile's eager calls: the layers learn their readers, then lay them out
    want = loss_fn()
    want_grads = torch.autograd.grad(want, params)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(as_one_call(loss_fn, model))
    for _ in range(2):
        got = compiled()
        got_grads = torch.autograd.grad(got, params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])


def recipe_kind(recipe: tuple) -> str:
    """What U's gradient is computed from: kept (x itself), layer_norm, gelu, mul, bmm (attention
    probabilities and values), attention (a fused kernel's output)."""
    fn = recipe[0]
    if fn is layer_mod._kept:
        return "kept"
    if fn is layer_mod._from_layer_norm or getattr(fn, "func", None) is layer_mod._layer_norm_again:
        return "layer_norm"
    make = fn.args[0]
    return {torch.bmm: "bmm", torch.mul: "mul", layer_mod._identity: "attention"}.get(make) or make.func.__name__


class Block(nn.Module):
    """A pre-norm transformer block in fp64 with every linear adapted: LayerNorm -> fused qkv ->
    attention (eager matmuls or fused SDPA) -> projection; LayerNorm -> fc1 -> GELU or
    quick_gelu -> fc2."""

    def __init__(self, attention: str, activation: str, d=8, heads=2, rank=3):
        super().__init__()
        kw = {"dtype": torch.float64}
        self.attention, self.activation, self.heads = attention, activation, heads
        self.factors = AuroraFactors(d, rank, 0.0, **kw)
        with torch.no_grad():
            self.factors.up.V.normal_()
        self.norm1, self.norm2 = nn.LayerNorm(d, **kw), nn.LayerNorm(d, **kw)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.weight.normal_()
                norm.bias.normal_()
                norm.requires_grad_(False)

        def adapted(i, o):
            return AuroraLinear(nn.Linear(i, o, **kw).requires_grad_(False), self.factors, self.factors)

        self.qkv, self.proj, self.fc1, self.fc2 = adapted(d, 3 * d), adapted(d, d), adapted(d, 4 * d), adapted(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.attention == "eager":
            out = torch.matmul((q @ k.transpose(-1, -2)).softmax(-1), v).permute(0, 2, 1, 3).reshape(B, T, d)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(out)
        h = self.fc1(self.norm2(x))
        h = torch.nn.functional.gelu(h) if self.activation == "gelu" else h * torch.sigmoid(1.702 * h)
        return x + self.fc2(h)

    def parameters_to_check(self):
        return [self.factors.down.U, self.factors.up.V, self.factors.up.core] + [m.coeffs for m in (self.qkv, self.proj, self.fc1, self.fc2)]


@pytest.mark.parametrize("attention,activation", [("eager", "gelu"), ("sdpa", "quick_gelu")])
def test_u_gradient_from_producer_saves_equals_kept_x(attention, activation):
    """U's gradient from what LayerNorm, GELU / quick_gelu and attention keep anyway equals the
    one from x kept, and the attention projection's input is among the rebuilt ones."""
    torch.manual_seed(0)
    block = Block(attention, activation)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *block.parameters_to_check()]

    def grads():
        return torch.autograd.grad((block(x) ** 2).sum(), params)

    kinds = []
    recipe = layer_mod.rebuild_recipe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_mod, "rebuild_recipe", lambda t, w, *n: kinds.append(recipe_kind(recipe(t, w, *n))) or recipe(t, w, *n))
        rebuilt = grads()
        mp.setattr(layer_mod, "rebuild_recipe", lambda t, w, *n: (layer_mod._kept,))
        kept = grads()
    act = "gelu" if activation == "gelu" else "mul"
    assert kinds == ["layer_norm", "bmm" if attention == "eager" else "attention", "layer_norm", act]
    for a, b in zip(rebuilt, kept):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_u_gradient_keeps_x_under_activation_checkpointing():
    """Under non-reentrant checkpointing nothing reads other nodes' saves (that would recompute in
    forward) and nothing is shared: same gradients, and the checkpoint's saved-tensor count check
    passes."""
    torch.manual_seed(0)
    block = Block("eager", "gelu")
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *block.parameters_to_check()]
    want = torch.autograd.grad((block(x) ** 2).sum(), params)
    kinds = []
    recipe = layer_mod.rebuild_recipe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_mod, "rebuild_recipe", lambda t, w, *n: kinds.append(recipe_kind(recipe(t, w, *n))) or recipe(t, w, *n))
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        got = torch.autograd.grad((out ** 2).sum(), params)
    assert set(kinds) == {"kept"}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class CrossLayers(nn.Module):
    """Two BERT-like layers: q, k, v of one hidden state, then a cross-attention key and value of
    the same memory tokens in each layer, all adapted through one factor set."""

    def __init__(self, sharing, d=6, dropout=0.3):
        super().__init__()
        kw = {"dtype": torch.float64}
        self.factors = AuroraFactors(d, 3, dropout, **kw)
        with torch.no_grad():
            self.factors.up.V.normal_()
        self.layers = nn.ModuleList()
        for _ in range(2):
            self.layers.append(nn.ModuleDict({n: AuroraLinear(nn.Linear(d, d, **kw).requires_grad_(False), self.factors,
                                                              self.factors, sharing=sharing)
                                              for n in ("query", "key", "value", "cross_key", "cross_value")}))
        if sharing is not None:
            sharing.attach([self])

    def forward(self, h, memory):
        for layer in self.layers:
            h = torch.tanh(layer["query"](h) + layer["key"](h) * layer["value"](h))
            h = h + (layer["cross_key"](memory) * layer["cross_value"](memory)).mean(1, keepdim=True)
        return h


def _count_down_calls(monkeypatch):
    calls = []
    apply = layer_mod.ModeDownProjection.apply
    monkeypatch.setattr(layer_mod.ModeDownProjection, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def test_u_is_computed_once_per_input_within_a_call(monkeypatch):
    """Sharing U·x gives the plain layers' outputs and gradients (dropout on, same draws), with one
    U·x per distinct input; nothing survives the call."""
    sharing = layer_mod.InputSharing()
    shared, plain = CrossLayers(sharing), CrossLayers(None)
    plain.load_state_dict(shared.state_dict())
    shared.train(), plain.train()
    h = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    calls = _count_down_calls(monkeypatch)
    results = []
    for model in (shared, plain):
        torch.manual_seed(3)
        out = model(h, memory)
        params = [h, memory, model.factors.down.U, model.factors.up.V, model.factors.up.core,
                  *(m.coeffs for layer in model.layers for m in layer.values())]
        results.append((out, torch.autograd.grad((out ** 2).sum(), params)))
        calls.append(None)
    # shared: h, memory, layer 2's h (3 inputs); plain: one per adapted layer (10)
    assert calls.index(None) == 3 and len(calls) - calls.index(None) - 2 == 10
    assert sharing.owner is None and not sharing.memo
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dropout", [0.0, 1e-9])
def test_readers_run_as_one_in_a_compiled_call(monkeypatch, dropout):
    """Compiled (one graph), the layers that eager calls before learnt to read one input one after
    another and laid out side by side run as one (U·x traced once, so that its backward is one
    duᵀ·x and one du·U for the set; one GEMM through their frozen weights; their updates one
    GEMM, or with dropout one batched GEMM over one draw of masks): the same loss and gradients
    as eager, in fp32. At dropout 1e-9 every mask keeps all (the batched path, comparable with
    eager's masks). Fails where each layer traces its own U·x (10 calls) or runs alone."""
    from torch._dynamo.utils import counters

    sharing = layer_mod.InputSharing()
    model = CrossLayers(sharing, d=8, dropout=dropout).float().train()
    h = torch.randn(2, 4, 8, requires_grad=True)
    memory = torch.randn(2, 7, 8, requires_grad=True)
    params = [h, memory, model.factors.down.U, model.factors.up.V, model.factors.up.core,
              *(m.coeffs for layer in model.layers for m in layer.values())]

    def loss():
        return model(h, memory).pow(2).sum()

    loss().backward()  # learns the readers; the next call (no backward to come) lays their weights out
    want = loss()
    want_grads = torch.autograd.grad(want, params)
    torch._dynamo.reset()
    counters.clear()
    calls, forward = [], layer_mod.ModeDown.forward
    monkeypatch.setattr(layer_mod.ModeDown, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    served, together = [], layer_mod.InputSharing._traced_together
    monkeypatch.setattr(layer_mod.InputSharing, "_traced_together",
                        lambda *a: (lambda y: served.append(y is not None) or y)(together(*a)))
    got = torch.compile(loss, fullgraph=True)()
    # per layer once for q, k, v and once for the cross k, v, not per layer (10); every layer served as one of its set
    assert len(calls) == 4 and served == [True] * 10
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not sharing.traced


@pytest.mark.timeout(300)
@pytest.mark.parametrize("one_call", [True, False])
def test_a_compiled_step_makes_the_blocks_once_for_every_call_of_the_model(monkeypatch, one_call):
    """A compiled step that calls the model twice (BLIP's calls its text encoder twice), run as one
    call of it (``as_one_call``): each kind's update blocks are traced once for the step, so that
    their backward runs once; without it, once per call of the model. The loss and gradients are
    eager's either way."""
    from aurora_ds.aurora import as_one_call

    sharing = layer_mod.InputSharing()
    model = CrossLayers(sharing, d=8, dropout=0.0).float().train()
    h = torch.randn(2, 4, 8, requires_grad=True)
    memory = torch.randn(2, 7, 8, requires_grad=True)
    params = [h, memory, model.factors.down.U, model.factors.up.V, model.factors.up.core,
              *(m.coeffs for layer in model.layers for m in layer.values())]

    def loss():
        return (model(h, memory) * model(h.flip(1), memory)).sum()

    loss().backward()
    want = loss()
    want_grads = torch.autograd.grad(want, params)
    torch._dynamo.reset()
    builds, build = [], layer_mod.InputSharing._build
    monkeypatch.setattr(layer_mod.InputSharing, "_build", lambda *a: builds.append(1) or build(*a))
    got = torch.compile(as_one_call(loss, model) if one_call else loss, fullgraph=True)()
    assert len(builds) == (1 if one_call else 2)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sharing.traced_owner is None and not sharing.traced


def test_one_call_closes_when_its_function_fails():
    """Eagerly, ``as_one_call`` opens one call of the model around its function and closes it
    even when the function raises, so the next call starts afresh (a call left open would keep
    its memo of inputs for ever)."""
    from aurora_ds.aurora import as_one_call

    sharing = layer_mod.InputSharing()
    model = CrossLayers(sharing, d=8, dropout=0.0).float().train()
    h, memory = torch.randn(2, 4, 8), torch.randn(2, 7, 8)

    def fails():
        model(h, memory)
        assert sharing.owner is not model and sharing.memo  # the function's call owns the memo
        raise RuntimeError("in the step")

    with pytest.raises(RuntimeError, match="in the step"):
        as_one_call(fails, model)()
    assert sharing.owner is None and not sharing.memo
    model(h, memory)
    assert sharing.owner is None and not sharing.memo


class _ChangedBetweenReads(nn.Module):
    """Two layers read h, which changes in place between the reads (nothing saved needs it)."""

    def __init__(self, sharing):
        super().__init__()
        self.factors = AuroraFactors(8, 3, 0.0)
        with torch.no_grad():
            self.factors.up.V.normal_()
        self.q, self.k = (AuroraLinear(nn.Linear(8, 8).requires_grad_(False), self.factors, self.factors, sharing=sharing)
                          for _ in range(2))
        sharing.attach([self])

    def forward(self, x):
        h = x * 2.0
        q = self.q(h)
        h.mul_(3.0)
        return q * self.k(h)


@pytest.mark.timeout(300)
def test_compiled_call_sees_an_input_changed_between_two_reads():
    """A traced graph cannot read version counters: U·x is shared there only among the readers
    an eager call learnt, which never span an in-place change, so the compiled call computes
    U·x afresh for the changed input and equals eager."""
    torch.manual_seed(0)
    model = _ChangedBetweenReads(layer_mod.InputSharing()).train()
    x = torch.randn(2, 4, 8)
    want = model(x).sum()
    torch._dynamo.reset()
    got = torch.compile(lambda: model(x).sum(), fullgraph=True)()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_shared_u_never_outlives_a_call_or_an_inplace_change():
    """The same input tensor in the next call, after U changed in place (an optimizer step),
    gives the new result; so does an input changed in place within one call."""
    sharing = layer_mod.InputSharing()
    model, plain = CrossLayers(sharing, dropout=0.0), CrossLayers(None, dropout=0.0)
    h = torch.randn(2, 4, 6, dtype=torch.float64)
    memory = torch.randn(2, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        model(h, memory)
        model.factors.down.U.add_(1.0)
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(h, memory), plain(h, memory), rtol=1e-12, atol=1e-12)

    class InPlace(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            first = self.inner.layers[0]["cross_key"](x)
            x.mul_(2.0)
            return first + self.inner.layers[1]["cross_key"](x)

    wrapped = InPlace(model)
    sharing.attach([wrapped])
    with torch.no_grad():
        want = plain.layers[0]["cross_key"](memory) + plain.layers[1]["cross_key"](2 * memory)
        torch.testing.assert_close(wrapped(memory.clone()), want, rtol=1e-12, atol=1e-12)


def test_gated_query_node_matches_the_formula():
    """GQT as one node: the same output and gradients as h + tanh(g)·λ·(h ⊙ γ + β) in fp64."""
    from aurora_ds.aurora.extras import GatedQueryTransform

    torch.manual_seed(0)
    gqt = GatedQueryTransform(6, scale=0.3, dtype=torch.float64)
    with torch.no_grad():
        for p in gqt.parameters():
            p.normal_()
    h = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    params = [h, gqt.gamma, gqt.beta, gqt.gate]
    got = gqt(h)
    want = h + torch.tanh(gqt.gate) * gqt.scale * (h * gqt.gamma + gqt.beta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), params), torch.autograd.grad((want * weights).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# Adapted inputs that keep x, per family, and why: the first layer reads embeddings (no gradient
# needed below them, or a dropout); a cross-attention query reads the GQT output; the Q-Former's
# layers with text read a concatenation of the query and text halves.
KEEPS_X = {
    "blip": (r"vision_model\.encoder\.layers\.0\.self_attn\.qkv", r".*\.layer\.0\.attention\.self\.query",
             r".*\.crossattention\.self\.query"),
    "blip2": (r"vision_model\.encoder\.layers\.0\.self_attn\.qkv", r"qformer\.encoder\.layer\.\d+\.attention\.attention\.query",
              r"qformer\.encoder\.layer\.\d+\.crossattention\.attention\.query"),
    "clip": (r"(text|vision)_model\.encoder\.layers\.0\.self_attn\.q_proj",),
    "vit": (r"blocks\.0\.attn\.qkv",),
    "eva": (r"blocks\.0\.attn\.qkv",),
}


@pytest.mark.parametrize("name", [n for n in __import__("aurora_ds").list_backbones() if "tiny" in n])
def test_rebuild_coverage_per_backbone_family(name):
    """Which adapted linears keep x, which compute U's gradient from their producer's saves
    (and from which), and which reuse another layer's U·x: printed as a table, and every kept
    x is one of the family's known cases (KEEPS_X)."""
    import re

    from aurora_ds import AuroraConfig, build_backbone, inject_aurora
    from aurora_ds.backbones import example_batch, forward_features, get_spec

    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_backbone(name)
    handle = inject_aurora(model, AuroraConfig(rank=4, backbone=name))
    model.train()
    current, kinds = [], {}
    for layer_name, layer in handle.layers.items():
        layer.register_forward_pre_hook(lambda m, a, n=layer_name: current.append(n))
    recipe = layer_mod.rebuild_recipe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_mod, "rebuild_recipe",
                   lambda t, w, *n: kinds.setdefault(current[-1], set()).add(recipe_kind(recipe(t, w, *n))) or recipe(t, w, *n))
        out = forward_features(model, spec, example_batch(spec, 2))
    table = {n: sorted(kinds.get(n, {"shared"})) for n in handle.layers}
    print(f"{name}:\n" + "\n".join(f"  {n}: {', '.join(k)}" for n, k in table.items()))
    allowed = KEEPS_X[name.split("-")[0]]
    keeping = [n for n, k in table.items() if "kept" in k]
    assert all(any(re.fullmatch(p, n) for p in allowed) for n in keeping), keeping
    assert sum("kept" not in k for k in table.values()) >= len(table) // 2
    if name.startswith("blip-"):  # the cross-attention keys and values of every layer read the image tokens once
        cross = [k for n, k in table.items() if re.search(r"crossattention\.self\.(key|value)", n)]
        assert sum(k != ["shared"] for k in cross) == (2 if "vqa" in name else 1), cross
    sum(o.float().pow(2).sum() for o in out.values()).backward()


def _blip_step_model(shared: bool, dropout: float):
    """BLIP-tiny in fp64 with Aurora (GQT on); ``shared=False`` turns off everything made once per
    call or step (each layer makes its own update matrices, U and GQT vectors)."""
    from aurora_ds import AuroraConfig, build_backbone, inject_aurora

    torch.manual_seed(0)
    model = build_backbone("blip-tiny-retrieval", dtype=torch.float64)
    handle = inject_aurora(model, AuroraConfig(rank=4, backbone="blip-tiny-retrieval", dropout=dropout))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in handle.named_aurora_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    if not shared:
        for layer in handle.layers.values():
            layer.sharing = None
        for gqt in handle.gated_query.values():
            gqt.memo = None
    return model.train(), handle


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_made_once_per_step_equals_made_per_layer(dropout):
    """A BLIP step (vision once, text alone and fused: the text layers run twice) with the update
    matrices, U and GQT's vectors made once per step gives the per-layer path's loss and
    gradients; after an in-place change of the factors (an optimizer step, with and without a
    backward in between) and under no_grad the new values are used."""
    from aurora_ds.backbones import example_batch, forward_features, get_spec

    spec = get_spec("blip-tiny-retrieval")
    batch = {k: v.double() if v.is_floating_point() else v for k, v in example_batch(spec, 2).items()}
    runs = []
    for shared in (True, False):
        model, handle = _blip_step_model(shared, dropout)
        params = [p for _, p in handle.named_trainable_parameters()]
        results = []
        for step in range(3):
            torch.manual_seed(5 + step)
            loss = sum(o.pow(2).mean() for o in forward_features(model, spec, batch).values())
            if step != 1:  # step 1: a forward whose backward never runs
                results.append((loss.detach(), torch.autograd.grad(loss, params)))
            with torch.no_grad():
                for p in params:
                    p.mul_(0.9).add_(0.01)
        model.eval()
        with torch.no_grad():
            results.append((sum(o.sum() for o in forward_features(model, spec, batch).values()), ()))
        runs.append(results)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(*runs):
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_step_leaves_nothing_to_the_cycle_collector():
    """What a step makes once (the update blocks, each layer's run of them) is freed when its
    backward has run, not whenever Python's cycle collector next runs: that can be hundreds of
    steps later, and BLIP-base left 40 MB of tensors a step to it (on a GPU, its memory)."""
    import gc

    from aurora_ds.backbones import example_batch, forward_features, get_spec

    spec = get_spec("blip-tiny-retrieval")
    model, handle = _blip_step_model(True, 0.1)
    batch = example_batch(spec, 2)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    params = [p for _, p in handle.named_trainable_parameters()]
    while gc.collect():  # earlier tests' cycles, some freed only by a collection (a compile's fake tensors)
        pass
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            loss = sum(o.pow(2).mean() for o in forward_features(model, spec, batch).values())
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p.sub_(0.01 * p.grad)
                    p.grad = None
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (torch.Tensor, once.Group, layer_mod.Run))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not left, collections.Counter(left)


def test_kernel_launching_ops_per_adapted_call():
    """What a GPU step launches (docs/gpu.md): Aurora's training step on BLIP's structure stays
    within a fixed number of kernel-launching ops per adapted call over the frozen floor's step
    (BLIP-tiny here: at most 8 by default, 6 with dropout 0 unmerged, 5 merged; measured 6.5,
    5.0 and 4.0; BLIP-base measures 4.6, 3.1 and 2.0, and peft's LoRA r=1 12.4)."""
    from aurora_ds.bench.kernels import count_kernels
    from aurora_ds.backbones import build_backbone, example_batch, forward_features, get_spec
    from aurora_ds import AuroraConfig, inject_aurora

    spec = get_spec("blip-tiny-retrieval")
    batch = example_batch(spec, 2)

    def ops(dropout, merged="auto", gated_query=True):
        torch.manual_seed(0)
        model = build_backbone("blip-tiny-retrieval").train()
        calls = []
        if dropout is None:
            model.requires_grad_(False)
            model.text_encoder.embeddings.word_embeddings.register_forward_hook(
                lambda m, i, o: o.detach().requires_grad_(True) * 1.0)
        else:
            handle = inject_aurora(model, AuroraConfig(rank=4, backbone="blip-tiny-retrieval", dropout=dropout,
                                                       merged=merged, gated_query=gated_query))
            for layer in handle.layers.values():
                layer.register_forward_hook(lambda *a: calls.append(1))

        def step():
            pixels = batch["pixel_values"].detach().requires_grad_(dropout is None)
            sum(o.pow(2).sum() for o in forward_features(model, spec, {**batch, "pixel_values": pixels}).values()).backward()

        step()
        model.zero_grad(set_to_none=True)
        calls.clear()
        return sum(count_kernels(step).values()), len(calls)

    floor, _ = ops(None)
    counts = {}
    for dropout, merged, most in ((0.1, "auto", 8), (0.0, "off", 6), (0.0, "on", 5)):
        aurora, calls = counts[merged] = ops(dropout, merged)
        assert calls == 26
        assert (aurora - floor) / calls <= most, (dropout, merged, aurora, floor, calls)
    # GQT launches nothing per block call (6 here: 2 layers, self-attention twice, cross-attention
    # once): its scale and shift are folded into each block's output LayerNorm, made for every
    # block once per step (10 ops) with their gradient (13). The 2 cross-attention queries then
    # keep their input (the GQT output) instead of running a LayerNorm again for U's gradient.
    # It was 58 (6 per call).
    plain, _ = ops(0.0, "off", gated_query=False)
    assert counts["off"][0] - plain + 2 <= 23, (counts["off"][0], plain)


class _Identity(torch.autograd.Function):
    """What ZeRO-3 wraps module outputs in: an identity node whose backward gets zeros where no
    gradient arrived (materialize_grads)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g


def test_u_gradient_through_a_wrapper_of_its_producer():
    """u's consumers add its gradient into a sink; a hook wrapping U·x's output (as ZeRO-3's do)
    then hands the producer a (zero) autograd gradient beside the sink: both are summed, with the
    plain layers' gradients."""
    sharing = layer_mod.InputSharing()
    shared, plain = CrossLayers(sharing, dropout=0.0), CrossLayers(None, dropout=0.0)
    plain.load_state_dict(shared.state_dict())
    shared.factors.down.register_forward_hook(lambda m, args, out: _Identity.apply(out))
    h = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (shared, plain):
        out = model(h, memory)
        params = [h, memory, model.factors.down.U, model.factors.up.V, model.factors.up.core]
        results.append(torch.autograd.grad((out ** 2).sum(), params))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _Wrapped(nn.Module):
    """One adapted layer as a model: its call opens the memo that makes the merged weight."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        layer.sharing.attach([self])

    def forward(self, x):
        return self.layer(x)


def _shared_layer(merging, d_in, d_out, a, b, dropout=0.0, dtype=torch.float64):
    layer = _layer(d_in, d_out, a, b, dropout=dropout, scale=0.7).to(dtype)
    layer.source.to(dtype), layer.target.to(dtype)  # not submodules of the layer
    layer.sharing = layer_mod.InputSharing()
    layer.sharing.merging = merging
    layer.sharing.register(layer.kind, layer)
    return _Wrapped(layer)


@pytest.mark.parametrize("d_in,d_out,a,b", BLOCKS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_merged_equals_unmerged(d_in, d_out, a, b, dtype, tol):
    """Without dropout, y = (W + s·ΔW) x + b through one merged weight gives the unmerged layer's
    output and every gradient (x, U, V, core, coeffs) on every block shape: 1x1, qkv (b = 3),
    fc2 (a = 4), fc1 (b = 4), between two widths."""
    results = []
    for merging in ("on", "off"):
        model = _shared_layer(merging, d_in, d_out, a, b, dtype=dtype).train()
        x = torch.randn(2, 5, a * d_in, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = model(x)
        assert ("MergedLinearBackward" in _node_names(out)) == (merging == "on")
        results.append((out, _grads(model.layer, out, x)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_merged_in_evaluation_only_where_dropout_is_on():
    """With dropout on, training runs unmerged and evaluation merged (with or without gradients),
    both equal to the reference."""
    model = _shared_layer("auto", 6, 6, 1, 3, dropout=0.3)
    x = torch.randn(80, 6, dtype=torch.float64, requires_grad=True)
    assert "MergedLinearBackward" not in _node_names(model.train()(x))
    model.eval()
    out = model(x)
    assert "MergedLinearBackward" in _node_names(out)
    want = reference(model.layer, x, None, 0.0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(model.layer, out, x), _grads(model.layer, want, x)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_auto_merges_where_the_rows_make_it_cheaper():
    """'auto' merges a 6 -> 18 layer (16 · in·out / (in + out) = 72) from 72 rows of input on, not below."""
    for rows, merged in ((71, False), (72, True)):
        model = _shared_layer("auto", 6, 6, 1, 3).train()
        out = model(torch.randn(rows, 6, dtype=torch.float64, requires_grad=True))
        assert ("MergedLinearBackward" in _node_names(out)) == merged, rows


def test_merged_with_shared_u():
    """q, k, v of one hidden state and cross-attention keys and values of one memory, merged: the
    per-layer unmerged path's outputs and gradients, one U·x per input, one merged node per call."""
    sharing = layer_mod.InputSharing()
    sharing.merging = "on"
    merged, plain = CrossLayers(sharing, dropout=0.0), CrossLayers(None, dropout=0.0)
    plain.load_state_dict(merged.state_dict())
    h = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (merged, plain):
        out = model.train()(h, memory)
        params = [h, memory, model.factors.down.U, model.factors.up.V, model.factors.up.core,
                  *(m.coeffs for layer in model.layers for m in layer.values())]
        results.append((out, _node_names(out), torch.autograd.grad((out ** 2).sum(), params)))
    assert "MergedLinearBackward" in results[0][1] and "MergedLinearBackward" not in results[1][1]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _Rerouted(CrossLayers):
    """CrossLayers whose value projection reads ``other`` instead of the hidden state, when given."""

    def forward(self, h, memory, other=None):
        for layer in self.layers:
            v = layer["value"](h if other is None else other)
            h = torch.tanh(layer["query"](h) + layer["key"](h) * v)
            h = h + (layer["cross_key"](memory) * layer["cross_value"](memory)).mean(1, keepdim=True)
        return h


@pytest.mark.parametrize("merging,dropout", [("on", 0.0), ("off", 0.0), ("off", 0.3)])
def test_layers_reading_one_input_run_as_one(monkeypatch, merging, dropout):
    """Layers that read one input one after another in the previous call (q, k, v; the
    cross-attention's k, v) run as one call from then on, merged or not, with or without dropout,
    with the per-layer path's outputs and gradients (each layer drawing the mask it would draw
    alone); a call that reads differently (v of another input, and v first) still gives them,
    and the next calls learn the new pattern, and the old one again (with dropout, that call's
    masks are not the per-layer path's: the group it learnt runs twice, once per input, and draws
    masks for layers whose output it does not use). With dropout, a group called in the order its
    blocks lie draws its k masks in one draw (:func:`test_one_draw_of_k_masks_is_k_draws_on_cpu`)."""
    sharing = layer_mod.InputSharing()
    sharing.merging = merging
    shared, plain = _Rerouted(sharing, dropout=dropout), _Rerouted(None, dropout=dropout)
    plain.load_state_dict(shared.state_dict())
    ids = [id(p) for p in shared.parameters()]
    widths = []  # the output width of each call of the three paths
    for fn, width in ((layer_mod.MergedLinear, lambda a: a[1].shape[0]), (layer_mod.ModeUpdate, lambda a: a[0].shape[-1]),
                      (layer_mod.ReadTogether, lambda a: a[4].shape[1])):
        monkeypatch.setattr(fn, "apply", partial(lambda apply, width, *a: widths[-1].append(width(a)) or apply(*a), fn.apply, width))
    draws = []  # the masks of each draw of each call (a batched draw expands one u)
    native_dropout = torch.native_dropout
    monkeypatch.setattr(torch, "native_dropout",
                        lambda u, *a: draws[-1].append(u.shape[0] if u.stride(0) == 0 else 1) or native_dropout(u, *a))
    g = torch.Generator().manual_seed(0)
    h, memory, other = (torch.randn(2, n, 6, dtype=torch.float64, generator=g, requires_grad=True) for n in (4, 7, 4))
    for call, rerouted in enumerate((False, False, True, True, False)):
        results = []
        for model in (shared, plain):
            widths.append([])
            draws.append([])
            torch.manual_seed(1)
            out = model.train()(h, memory, other if rerouted else None)
            params = [h, memory, other, model.factors.down.U, model.factors.up.V, model.factors.up.core,
                      *(m.coeffs for layer in model.layers for m in layer.values())]
            results.append((out, torch.autograd.grad((out ** 2).sum(), params, allow_unused=True)))
            with torch.no_grad():
                for p in params[3:]:
                    p.mul_(0.9).add_(0.01)  # an optimizer step: the next call merges anew
        assert widths.pop() == [6] * 10  # the plain model: each layer alone
        assert draws.pop() == ([1] * 10 if dropout else [])
        if dropout and call == 2:
            continue
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # learnt: nothing; q, k, v (called v first) and cross k, v; q, k (v of one input, then q, k of
    # another: all three for each); q, k; q, k again (v of h alone: it read `other` last time)
    assert widths == [[6] * 10, [18, 12] * 2, [18, 18, 12] * 2, [6, 12, 12] * 2, [6, 12, 12] * 2]
    # v called first: a draw per layer; the cross k, v and (from the fourth call) q, k: one draw each
    assert draws == ([[1] * 10, [1, 1, 1, 2] * 2, ([1] * 6 + [2]) * 2, [1, 2, 2] * 2, [1, 2, 2] * 2]
                     if dropout else [[]] * 5)
    assert sharing.owner is None and not sharing.memo
    if merging == "off":
        out = shared(h, memory)
        assert "ReadTogetherBackward" in _node_names(out)
        _assert_laid_out(shared, 8, ids)
        out.sum().backward()
    shared.float(), plain.float()  # new tensors, and no backward to come: the weights and biases are laid out again
    outs = []
    for model in (shared, plain):
        torch.manual_seed(2)
        outs.append(model(h.float(), memory.float()))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    if merging == "off":
        _assert_laid_out(shared, 4, ids)
        # moved again while the last call's backward is to come, the tensors autograd keeps for it would
        # live on beside the new ones: the layers run alone until it has run
        shared.double()
        widths.append([])
        outs.append(shared(h, memory))
        assert widths[-1] == [6] * 10 and torch.float64 not in {t.dtype for t in sharing.laid_out.values()}
        sum(o.double().sum() for o in (outs[0], outs[-1])).backward()
        widths.append([])
        shared(h, memory).sum().backward()
        assert widths[-1] == [18, 12] * 2
        _assert_laid_out(shared, 8, ids)
        assert {t.dtype for t in sharing.laid_out.values()} == {torch.float64}  # none of the old layouts is kept


class _Summed(CrossLayers):
    """q + k + v and the cross k + v, whose sums keep none of their inputs for the backward; records
    per layer the width of the output q's slice belongs to and whether it is freed with the slices."""

    def forward(self, h, memory):
        self.seen = []
        for layer in self.layers:
            outs = [layer[n](h) for n in ("query", "key", "value")]
            made = outs[0] if outs[0]._base is None else outs[0]._base
            width, made = made.shape[-1], weakref.ref(made)
            h = torch.tanh(sum(outs))
            del outs
            self.seen.append((width, made() is None))
            h = h + (layer["cross_key"](memory) + layer["cross_value"](memory)).mean(1, keepdim=True)
        return h


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_output_read_together_lives_only_as_long_as_its_slices(dropout):
    """The one output of layers read together is freed when the model lets go of the layers'
    slices, not kept to the end of the call by the memo that hands them out: kept, BLIP-base's
    cross-attention keys and values over the image tokens (12 x 2 x batch x 197 x 768) all lived
    to the end of the forward, +76 MB of peak at 224 px, batch 8."""
    sharing = layer_mod.InputSharing()
    model = _Summed(sharing, dropout=dropout).train()
    h, memory = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    for call in range(3):
        model(h, memory).sum().backward()
        # the first call learns who reads together; then q, k, v run as one
        assert model.seen == [(6 if call == 0 else 18, True)] * 2
    assert not sharing.memo


def test_one_draw_of_k_masks_is_k_draws_on_cpu():
    """Layers read together draw their k dropout masks in one draw (:class:`ReadTogether`). On a
    CPU the generator draws them element by element, so they are the masks the layers draw one
    after another when run alone: what lets the tests compare the two paths under one seed."""
    u = torch.randn(35, 8, dtype=torch.float64)
    torch.manual_seed(0)
    together = torch.native_dropout(u.expand(3, *u.shape), 0.3, True)
    torch.manual_seed(0)
    alone = [torch.native_dropout(u, 0.3, True) for _ in range(3)]
    for got, want in zip(together, zip(*alone)):
        assert torch.equal(got, torch.stack(want))
    assert 0 < together[1].sum() < together[1].numel()


def _assert_laid_out(model: "CrossLayers", size: int, ids: list[int]):
    """The frozen weights and biases of the layers read together are each group's rows of one
    tensor, in their order, the model's parameters the same objects and no bigger in memory."""
    for layer in model.layers:
        for names in (("query", "key", "value"), ("cross_key", "cross_value")):
            for part, numel in (("weight", 36), ("bias", 6)):
                tensors = [getattr(layer[n], part) for n in names]
                assert [t.data_ptr() for t in tensors] == [tensors[0].data_ptr() + i * numel * size for i in range(len(names))]
                assert tensors[0].untyped_storage().nbytes() == len(names) * numel * size
    assert [id(p) for p in model.parameters()] == ids


def _assert_saved_as_is(model: nn.Module, directory):
    """A model whose frozen weights share storage (layers read together) saves and loads each
    tensor's own values: ``torch.save`` (read back without unpickling code) and
    ``save_pretrained`` (safetensors, which refuses tensors sharing memory unless told)."""
    from safetensors.torch import load_file

    state = model.state_dict()
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) < len(state)  # some are shared
    torch.save(state, directory / "state.pt")
    model.save_pretrained(directory / "pretrained")
    for loaded in (torch.load(directory / "state.pt", weights_only=True), load_file(directory / "pretrained" / "model.safetensors")):
        assert loaded.keys() == state.keys()
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor), name


def test_merged_falls_back_or_refuses_under_zero3():
    """Under ZeRO-3 a frozen weight is used only through its module's call (whose hooks gather in
    the same order on every rank), partitioned or persistent alike: 'auto' runs the layer unmerged
    even where its rows would merge it (same result), 'on' refuses."""
    want = _shared_layer("off", 6, 6, 1, 3)
    x = torch.randn(80, 6, dtype=torch.float64)  # rows enough for 'auto' to merge without ZeRO-3
    for persist in (False, True):
        for merging in ("auto", "on"):
            model = _shared_layer(merging, 6, 6, 1, 3)
            model.layer.base_layer.weight.ds_id, model.layer.base_layer.weight.ds_persist = 0, persist
            if merging == "on":
                with pytest.raises(RuntimeError, match="ZeRO-3 manages the frozen weights"):
                    model(x)
            else:
                out = model(x)
                assert "MergedLinearBackward" not in _node_names(out)
                torch.testing.assert_close(out, want(x), rtol=1e-12, atol=1e-12)
    assert "MergedLinearBackward" in _node_names(_shared_layer("auto", 6, 6, 1, 3)(x.requires_grad_()))


def test_merged_blip_step_equals_unmerged(monkeypatch, tmp_path):
    """BLIP-tiny steps at dropout 0 (vision once, text alone and fused), merged and unmerged: the
    same losses and gradients, also after an in-place change of the factors (an optimizer step,
    so the merged weights are made anew) and in evaluation. Merged, every adapted call's output
    comes from a merged call, and from the second step on the layers that read one input (the
    text's query, key and value; the cross-attention's key and value) run as one."""
    from aurora_ds.backbones import example_batch, forward_features, get_spec

    spec = get_spec("blip-tiny-retrieval")
    batch = {k: v.double() if v.is_floating_point() else v for k, v in example_batch(spec, 2).items()}
    merged_widths = []
    apply = layer_mod.MergedLinear.apply
    monkeypatch.setattr(layer_mod.MergedLinear, "apply",
                        lambda x, weight, *a: merged_widths[-1].append(weight.shape[0]) or apply(x, weight, *a))
    runs = []
    for merging in ("on", "off"):
        model, handle = _blip_step_model(True, 0.0)
        layer_widths = []
        for layer in handle.layers.values():
            layer.sharing.merging = merging
            layer.register_forward_hook(lambda m, *_: layer_widths[-1].append(m.out_features))
        params = [p for _, p in handle.named_trainable_parameters()]
        results = []
        for _ in range(2):
            merged_widths.append([])
            layer_widths.append([])
            loss = sum(o.pow(2).mean() for o in forward_features(model, spec, batch).values())
            results.append((loss.detach(), torch.autograd.grad(loss, params)))
            with torch.no_grad():
                for p in params:
                    p.mul_(0.9).add_(0.01)
        model.eval()
        layer_widths.append([])  # (evaluation runs without MergedLinear)
        with torch.no_grad():
            results.append((sum(o.sum() for o in forward_features(model, spec, batch).values()), ()))
        runs.append(results)
        if merging == "on":
            layer_widths = layer_widths[:2]
            assert [len(c) for c in layer_widths] == [26, 26]
            assert [sum(c) for c in merged_widths] == [sum(c) for c in layer_widths]  # every output merged
            # vision (fused qkv, proj, fc1, fc2) x 2 layers alone; then the fused text call, then the text
            # alone, both 2 layers: its q, k, v learnt in the first step's fused call but run alone in the
            # text-alone call (their biases are not moved while that call's backward is to come: autograd may
            # keep the present ones), its cross k, v learnt in the first step
            assert merged_widths[0][8:] == [32] * 18
            assert merged_widths[1][8:] == [96, 32, 64] * 2 + [96, 96]
        else:
            assert merged_widths[-2:] == [[], []]
            _assert_saved_as_is(model, tmp_path)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(*runs):
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class MultiBlockLayers(nn.Module):
    """Two transformer-like layers through one factor set: a fused qkv (b = 3), an output
    projection, an MLP's fc1 (b = 4) and fc2 (a = 4)."""

    def __init__(self, sharing, d=6):
        super().__init__()
        torch.manual_seed(0)
        kw = {"dtype": torch.float64}
        self.factors = AuroraFactors(d, 3, 0.0, **kw)
        self.layers = nn.ModuleList(
            nn.ModuleList(AuroraLinear(nn.Linear(a * d, b * d, **kw).requires_grad_(False), self.factors, self.factors,
                                       0.7, sharing) for a, b in ((1, 3), (1, 1), (1, 4), (4, 1)))
            for _ in range(2))
        with torch.no_grad():
            for p in self.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p))
        if sharing is not None:
            sharing.attach([self])

    def forward(self, h):
        for qkv, proj, fc1, fc2 in self.layers:
            h = h + proj(qkv(h).unflatten(-1, (3, -1)).prod(-2))
            h = h + fc2(torch.tanh(fc1(h)))
        return h


@pytest.mark.parametrize("merging", ["off", "on"])
def test_coefficient_gradients_arrive_in_their_layout(merging):
    """Made once per step for a group of multi-block layers (qkv, fc1, fc2), the update blocks
    give each layer's coefficients the per-layer path's gradient, already in the parameter's
    layout: backward dispatches no ``copy_`` (autograd's copy of a gradient in another layout
    into the parameter's was one per multi-block layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.copy_.default
            return func(*args, **(kwargs or {}))

    sharing = layer_mod.InputSharing()
    sharing.merging = merging
    shared, plain = MultiBlockLayers(sharing), MultiBlockLayers(None)
    h = torch.randn(2, 4, 6, dtype=torch.float64)
    for model in (shared, plain):
        loss = model.train()(h).pow(2).sum()
        with Copies() as copies:
            loss.backward()
        if model is shared:
            assert copies.count == 0
    assert ("MergedLinearBackward" in _node_names(shared(h))) == (merging == "on")
    for got, want in zip(shared.parameters(), plain.parameters()):
        if want.requires_grad:
            assert got.grad.stride() == got.stride()
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(300)
def test_compiled_coefficients_are_gathered_by_one_op_each_way():
    """Compiled, each kind's Λᵀ is one op the compiled code calls, and so is the coefficients'
    flat gradient (inductor copies each input of a concatenation of graph inputs by a kernel of
    its own: one per adapted layer); the gradients are eager's, in the parameters' layout."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model = MultiBlockLayers(layer_mod.InputSharing())
    h = torch.randn(2, 4, 6, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return model(h).pow(2).sum()

    loss().backward()
    want = torch.autograd.grad(loss(), params)
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    for backend in (aot_autograd(fw_compiler=keep, bw_compiler=keep), "inductor"):
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(loss, backend=backend, fullgraph=True)(), params)
        for a, b in zip(got, want):
            assert a.stride() == b.stride()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    nodes = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    targets = collections.Counter(str(n.target) for n in nodes)
    # two kinds (a == 1: qkv, projection, fc1; b == 1: fc2)
    assert targets["aurora_ds.gathered_rows.default"] == targets["aurora_ds.gathered_rows_grad.default"] == 2
    # no concatenation of the coefficients (the model's own, prod's backward, joins two tensors)
    assert all(len(n.args[0]) == 2 for n in nodes if n.target is torch.ops.aten.cat.default)


@pytest.mark.parametrize("d_in,d_out,a,b", [(6, 6, 4, 1), (6, 6, 1, 4), (5, 7, 1, 1)])
def test_merged_weight_is_in_the_frozen_weights_layout(monkeypatch, d_in, d_out, a, b):
    """The merged weight of fc2 (a = 4), fc1 (b = 4) and a layer between widths is W + s·ΔW laid
    out as W (contiguous out x in), so the merged linear reads it without a copy."""
    weights = []
    apply = layer_mod.MergedLinear.apply
    monkeypatch.setattr(layer_mod.MergedLinear, "apply", lambda x, w, *rest: weights.append(w) or apply(x, w, *rest))
    model = _shared_layer("on", d_in, d_out, a, b, dtype=torch.float32).train()
    model(torch.randn(2, 5, a * d_in, requires_grad=True))
    (weight,) = weights
    base = model.layer.base_layer.weight
    assert weight.shape == base.shape and weight.stride() == base.stride()
    with torch.no_grad():
        torch.testing.assert_close(weight, base + model.layer.delta_weight(), rtol=1e-5, atol=1e-5)



def _seeded_factors() -> AuroraFactors:
    """One factor set (width 6, rank 3, dropout 0.3, fp64) with V non-zero, so every gradient flows."""
    torch.manual_seed(0)
    factors = AuroraFactors(6, 3, 0.3, dtype=torch.float64)
    with torch.no_grad():
        factors.up.V.normal_()
    return factors


def _record_nodes(monkeypatch) -> list:
    """The names of the layer nodes applied (ReadTogether, ModeUpdate), in order, from now on."""
    calls = []
    for fn in (layer_mod.ReadTogether, layer_mod.ModeUpdate):
        monkeypatch.setattr(fn, "apply", partial(lambda apply, name, *a: calls.append(name) or apply(*a), fn.apply, fn.__name__))
    return calls


class _ThreeReaders(nn.Module):
    """Three adapted layers reading one x through one factor set, of two kinds (scales 1 and 0.5,
    then 1 again: never consecutive, so never read together); the last one's base weight trains."""

    def __init__(self, sharing):
        super().__init__()
        self.factors = _seeded_factors()
        self.layers = nn.ModuleList(AuroraLinear(nn.Linear(6, 6, dtype=torch.float64).requires_grad_(False), self.factors,
                                                 self.factors, scale, sharing=sharing) for scale in (1.0, 0.5, 1.0))
        self.layers[2].base_layer.weight.requires_grad_(True)
        if sharing is not None:
            sharing.attach([self])

    def forward(self, x):
        return sum(layer(x).pow(2).sum() for layer in self.layers)


def test_input_gradient_gathered_through_the_shared_u(monkeypatch):
    """Layers that read one x through one factor set but run apart share u: the two run alone in
    one node (frozen linear and update) hand x's gradient to u's producer, which adds its own
    share in place and returns the sum; autograd adds the trained layer's (frozen linear and
    update as two nodes). Outputs and every gradient, x's included, equal the per-layer path's,
    with dropout, over steps with an in-place factor change between them."""
    calls = _record_nodes(monkeypatch)
    models = _ThreeReaders(layer_mod.InputSharing()), _ThreeReaders(None)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    for step in range(3):
        results = []
        for model in models:
            calls.clear()
            torch.manual_seed(step)
            loss = model.train()(x)
            params = [x] + [p for p in model.parameters() if p.requires_grad]
            results.append((loss, torch.autograd.grad(loss, params)))
            with torch.no_grad():
                model.factors.down.U.mul_(0.9)
        assert calls == ["ModeUpdate"] * 3  # the per-layer path, just run
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    calls.clear()
    models[0](x)
    assert calls == ["ReadTogether", "ReadTogether", "ModeUpdate"]


class _ByInput(nn.Module):
    """An MLP's fc2: one layer with blocks by input (a = 4) reading x alone."""

    def __init__(self, sharing):
        super().__init__()
        self.factors = _seeded_factors()
        self.fc2 = AuroraLinear(nn.Linear(24, 6, dtype=torch.float64).requires_grad_(False), self.factors, self.factors,
                                sharing=sharing)
        if sharing is not None:
            sharing.attach([self])

    def forward(self, x):
        return self.fc2(x).pow(2).sum()


def test_blocks_by_input_alone_run_as_one_node(monkeypatch):
    """A layer with blocks by input (fc2) runs its frozen linear and its update as one node too,
    x's gradient added in place by u's producer, not by autograd's add of two branches: outputs
    and every gradient equal the per-layer path's, with dropout, across an in-place factor change."""
    calls = _record_nodes(monkeypatch)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    models = ((_ByInput(layer_mod.InputSharing()), "ReadTogether"), (_ByInput(None), "ModeUpdate"))
    for step in range(2):
        results = []
        for model, node in models:
            calls.clear()
            torch.manual_seed(step)
            loss = model.train()(x)
            assert calls == [node]
            params = [x] + [p for p in model.parameters() if p.requires_grad]
            results.append((loss, torch.autograd.grad(loss, params)))
            with torch.no_grad():
                model.factors.down.U.mul_(0.9)
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
