"""The adapted linear against today's reference math in fp64: same outputs and gradients with
dropout on (same mask) and off; x rebuilt from LayerNorm and GELU saves; torch.compile."""

import pytest
import torch
from torch import nn

from aurora_ds.aurora import layer as layer_mod
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


BLOCKS = [(6, 6, 1, 1), (6, 6, 1, 3), (6, 6, 4, 1), (6, 6, 1, 4), (5, 7, 1, 1)]


@pytest.mark.parametrize("d_in,d_out,a,b", BLOCKS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_reference_in_fp64(monkeypatch, d_in, d_out, a, b, dropout):
    layer = _layer(d_in, d_out, a, b, dropout=dropout, scale=0.7).train()
    masks = []
    apply = layer_mod.ModeUpdate.apply

    def record(*args):
        masks.append(args[5])
        return apply(*args)

    monkeypatch.setattr(layer_mod.ModeUpdate, "apply", record)
    x = torch.randn(2, 5, a * d_in, dtype=torch.float64, requires_grad=True)
    got = layer(x)
    (mask,) = masks
    assert (mask is None) == (dropout == 0) and (mask is None or mask.dtype == torch.bool)
    want = reference(layer, x, mask, dropout)
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
    frames to recompile for each block shape), the same loss and gradients as eager."""
    from torch._dynamo.utils import counters

    from aurora_ds import AuroraConfig, build_backbone, inject_aurora
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

    want = loss_fn()
    want_grads = torch.autograd.grad(want, params)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss_fn)
    for _ in range(2):
        got = compiled()
        got_grads = torch.autograd.grad(got, params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_x_is_rebuilt_from_layer_norm_and_gelu_saves():
    """U's gradient from x rebuilt out of its producer's saved tensors equals the one from x kept."""
    torch.manual_seed(0)
    source = AuroraFactors(6, 3, 0.0, dtype=torch.float64)
    with torch.no_grad():
        source.up.V.normal_()
    norm = nn.LayerNorm(6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm.requires_grad_(False)
    fc1 = AuroraLinear(nn.Linear(6, 24, dtype=torch.float64).requires_grad_(False), source, source)
    fc2 = AuroraLinear(nn.Linear(24, 6, dtype=torch.float64).requires_grad_(False), source, source)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    params = [x, source.down.U, source.up.V, source.up.core, fc1.coeffs, fc2.coeffs]

    def grads():
        out = fc2(torch.nn.functional.gelu(fc1(norm(x))))
        return torch.autograd.grad((out ** 2).sum(), params)

    recipes = []
    recipe = layer_mod.rebuild_recipe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_mod, "rebuild_recipe", lambda t, w: recipes.append(recipe(t, w)) or recipes[-1])
        rebuilt = grads()
        assert [r[0] is layer_mod._kept for r in recipes] == [False, False]
        mp.setattr(layer_mod, "rebuild_recipe", lambda t, w: (layer_mod._kept,))
        kept = grads()
    for a, b in zip(rebuilt, kept):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in __import__("aurora_ds").list_backbones() if "tiny" in n])
def test_rebuild_coverage_per_backbone_family(name):
    """Every family rebuilds most adapted inputs (LayerNorm and GELU outputs) rather than keeping them."""
    from aurora_ds import AuroraConfig, build_backbone, inject_aurora
    from aurora_ds.backbones import example_batch, forward_features, get_spec

    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_backbone(name)
    inject_aurora(model, AuroraConfig(rank=4, backbone=name))
    model.train()
    recipes = []
    recipe = layer_mod.rebuild_recipe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_mod, "rebuild_recipe", lambda t, w: recipes.append(recipe(t, w)) or recipes[-1])
        out = forward_features(model, spec, example_batch(spec, 2))
    rebuilt = sum(r[0] is not layer_mod._kept for r in recipes)
    print(f"{name}: x rebuilt for {rebuilt} of {len(recipes)} U·x")
    assert rebuilt >= len(recipes) // 3, (rebuilt, len(recipes))
    sum(o.float().pow(2).sum() for o in out.values()).backward()
