"""The method on real backbones: identity at init, the block formula, gradients, merge, files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aurora_ds import AuroraConfig, build_backbone, inject_aurora, list_backbones, load_adapter
from aurora_ds.aurora.layer import AuroraLinear
from aurora_ds.backbones import example_batch, forward_features, get_spec

TINY = [n for n in list_backbones() if "tiny" in n]
LARGE = [n for n in list_backbones() if "tiny" not in n]


def _adapted(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_backbone(name).eval()
    return model, inject_aurora(model, AuroraConfig(rank=kw.pop("rank", 4), backbone=name, **kw))


def _randomize(handle, seed=1, std=0.1):
    """Give every Aurora tensor (V and gates included) a non-zero value, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.named_aurora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _identity_at_init(name, batch_size, dtype=torch.float32):
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_backbone(name, dtype=dtype).eval()
    batch = example_batch(spec, batch_size)
    with torch.no_grad():
        before = forward_features(model, spec, batch)
        handle = inject_aurora(model, AuroraConfig(rank=8, backbone=name))
        after = forward_features(model, spec, batch)
    assert handle.layers, name
    for key in before:
        assert (before[key] - after[key]).abs().max().item() <= 1e-6, (name, key)


@pytest.mark.parametrize("name", TINY)
def test_adapted_equals_frozen_at_init(name):
    _identity_at_init(name, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_adapted_equals_frozen_at_init_full_size(name):
    # 3.7 B parameters would take 15 GB in fp32; V = 0 and closed gates add exact zeros, so
    # the check is exact in bf16 too.
    _identity_at_init(name, 1, torch.bfloat16 if name == "blip2-opt-2.7b-vqa" else torch.float32)


@pytest.mark.parametrize("name", TINY)
def test_update_matches_block_formula(name):
    """Probe each adapted layer and compare with ΔW built block by block from the factors."""
    model, handle = _adapted(name, rank=3)
    _randomize(handle)
    for layer_name, layer in handle.layers.items():
        U, up, lam = layer.source.down.U, layer.target.up, layer.coeffs.detach()
        d_in, d_out = layer.source.width, layer.target.width
        a, b = layer.in_features // d_in, layer.out_features // d_out
        delta = torch.zeros(layer.out_features, layer.in_features)
        for j in range(b):
            for i in range(a):
                m = sum(up.core[:, :, t] * lam[t, j * a + i] for t in range(layer.target.rank))
                delta[j * d_out:(j + 1) * d_out, i * d_in:(i + 1) * d_in] = up.V @ m.T @ U
        x = torch.randn(5, layer.in_features)
        expected = torch.nn.functional.linear(x, layer.weight + delta, layer.bias)
        with torch.no_grad():
            got = layer(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), layer_name
        assert not torch.allclose(got, layer.base_layer(x), atol=1e-5), layer_name


def test_fused_qkv_and_mlp_block_shapes():
    _, handle = _adapted("vit-tiny")
    shapes = {n.split(".", 2)[-1]: (l.b, l.a, tuple(l.coeffs.shape)) for n, l in handle.layers.items()}
    assert shapes["attn.qkv"] == (3, 1, (4, 3))
    assert shapes["mlp.fc1"] == (4, 1, (4, 4))
    assert shapes["mlp.fc2"] == (1, 4, (4, 4))
    assert shapes["attn.proj"] == (1, 1, (4, 1))


def test_two_widths_get_two_factor_sets():
    _, handle = _adapted("clip-tiny", ranks={48: 6})
    assert handle.describe()["factor_sets"] == {"d32": {"width": 32, "rank": 4, "parts": ["down", "up"]},
                                                "d48": {"width": 48, "rank": 6, "parts": ["down", "up"]}}
    text = handle.layers["text_model.encoder.layers.0.self_attn.q_proj"]
    vision = handle.layers["vision_model.encoder.layers.0.self_attn.q_proj"]
    assert (text.source.width, vision.source.width) == (32, 48)
    assert text.source is text.target and vision.source is vision.target
    assert text.source is not vision.source


def test_layers_between_widths_use_both_factor_sets():
    """BLIP-2: the vision MLP (48 -> 208) and the Q-Former cross-attention keys and values
    (48-d image tokens -> 32) are single blocks between two widths."""
    _, handle = _adapted("blip2-tiny-retrieval")
    fc1 = handle.layers["vision_model.encoder.layers.0.mlp.fc1"]
    fc2 = handle.layers["vision_model.encoder.layers.0.mlp.fc2"]
    key = handle.layers["qformer.encoder.layer.0.crossattention.attention.key"]
    query = handle.layers["qformer.encoder.layer.0.crossattention.attention.query"]
    qkv = handle.layers["vision_model.encoder.layers.0.self_attn.qkv"]
    assert (fc1.source.width, fc1.target.width, fc1.a, fc1.b) == (48, 208, 1, 1)
    assert (fc2.source.width, fc2.target.width) == (208, 48)
    assert (key.source.width, key.target.width) == (48, 32)
    assert query.source is query.target and query.source.width == 32
    assert qkv.source is qkv.target and (qkv.a, qkv.b) == (1, 3)
    assert key.source is qkv.source, "one factor set per width, shared across towers"
    assert {k: f["width"] for k, f in handle.describe()["factor_sets"].items()} == {"d32": 32, "d48": 48, "d208": 208}


def test_tower_ranks_give_a_tower_its_own_factor_sets(tmp_path):
    _, handle = _adapted("blip2-tiny-retrieval", tower_ranks={"qformer": 2})
    sets = handle.describe()["factor_sets"]
    assert sets["qformer_d32"] == {"width": 32, "rank": 2, "parts": ["down", "up"]}
    # The Q-Former only reads 48-d image tokens: its 48-wide set needs U alone.
    assert sets["qformer_d48"] == {"width": 48, "rank": 2, "parts": ["down"]}
    assert sets["d48"]["rank"] == 4 and "d32" not in sets
    key = handle.layers["qformer.encoder.layer.0.crossattention.attention.key"]
    assert key.source is handle.factors["qformer_d48"] and tuple(key.coeffs.shape) == (2, 1)
    handle.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["factor_sets"] == sets and meta["aurora"]["tower_ranks"] == {"qformer": 2}
    assert "aurora_factors.qformer_d48.down.U" in load_file(str(tmp_path / "a" / "adapter.safetensors"))
    reloaded = load_adapter(build_backbone("blip2-tiny-retrieval"), tmp_path / "a")
    assert reloaded.describe()["factor_sets"] == sets


def test_layers_between_widths_need_equal_ranks():
    with pytest.raises(ValueError, match=r"cannot adapt vision_model\.encoder\.layers\.0\.mlp\.fc1: it maps width 48 "
                                         r"\(rank 6\) to width 208 \(rank 4\)"):
        _adapted("blip2-tiny-retrieval", ranks={48: 6})
    with pytest.raises(ValueError, match=r"tower_ranks\[''\]|not a module-name prefix"):
        AuroraConfig(tower_ranks={"": 3})
    with pytest.raises(ValueError, match=r"tower_ranks\['qformer'\] must be a positive integer"):
        AuroraConfig(tower_ranks={"qformer": 0})


@pytest.mark.parametrize("name", ["blip-tiny-retrieval", "blip-tiny-vqa", "clip-tiny", "vit-tiny", "eva-tiny",
                                  "blip2-tiny-retrieval", "blip2-opt-tiny-vqa"])
def test_gradients_reach_only_aurora_and_loss_falls(name):
    spec = get_spec(name)
    model, handle = _adapted(name)
    model.train()
    handle.config.dropout = 0.0
    for f in handle.factors.values():
        if f.down is not None:
            f.down.dropout = 0.0
    batch = example_batch(spec, 2)
    # Targets from the same model with some other adapter: reachable, so the loss must fall.
    start = {n: p.detach().clone() for n, p in handle.named_aurora_parameters()}
    _randomize(handle, seed=7, std=0.5)
    with torch.no_grad():
        targets = forward_features(model, spec, batch)
        for n, p in handle.named_aurora_parameters():
            p.copy_(start[n])

    def loss_fn():
        out = forward_features(model, spec, batch)
        return sum(((out[k] - targets[k]) ** 2).mean() for k in out)

    aurora = {n for n, _ in handle.named_aurora_parameters()}
    opt = torch.optim.AdamW([p for _, p in handle.named_trainable_parameters()], lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    for n, p in model.named_parameters():
        if n in aurora:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        else:
            assert p.grad is None and not p.requires_grad, f"frozen {n} got a gradient"
    # Adam at lr 1e-2 need not fall at every step; over ten it must fall clearly.
    assert losses[-1] < losses[0] * 0.98 and sum(b < a for a, b in zip(losses, losses[1:])) >= 7, losses


@pytest.mark.parametrize("name", ["blip-tiny-retrieval", "vit-tiny", "clip-tiny", "eva-tiny", "blip2-tiny-retrieval"])
def test_merge_and_unmerge(name):
    spec = get_spec(name)
    model, handle = _adapted(name)
    _randomize(handle)
    batch = example_batch(spec, 2)
    weights = {n: l.weight.detach().clone() for n, l in handle.layers.items()}
    with torch.no_grad():
        adapted = forward_features(model, spec, batch)
        handle.merge()
        merged = forward_features(model, spec, batch)
        assert any(not torch.equal(weights[n], l.weight) for n, l in handle.layers.items())
        with pytest.raises(RuntimeError, match="already merged"):
            handle.merge()
        handle.unmerge()
    for key in adapted:
        assert torch.allclose(adapted[key], merged[key], atol=1e-4, rtol=1e-4), key
    for n, l in handle.layers.items():
        assert torch.allclose(weights[n], l.weight, atol=1e-6), n


@pytest.mark.parametrize("name", ["blip-tiny-retrieval", "blip-tiny-vqa", "clip-tiny", "blip2-tiny-retrieval"])
def test_save_and_load_round_trip(tmp_path, name):
    spec = get_spec(name)
    model, handle = _adapted(name)
    if spec.trained_heads:
        handle.train_modules(list(spec.trained_heads))
    _randomize(handle)
    with torch.no_grad():
        for n, p in handle.named_trainable_parameters():
            p.add_(0.01)
    handle.save(tmp_path / "adapter")
    batch = example_batch(spec, 2)
    with torch.no_grad():
        expected = forward_features(model, spec, batch)

    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["aurora"]["rank"] == 4 and meta["aurora"]["backbone"] == name
    assert meta["layers"] == list(handle.layers)
    tensors = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    buffers = dict(handle.named_aurora_buffers())  # ICE's running context, where ICE is injected
    assert set(buffers) == ({"aurora_context.running_context", "aurora_context.batches_tracked"} if handle.context else set())
    assert set(tensors) == {n for n, _ in handle.named_trainable_parameters()} | set(buffers)
    assert sum(t.numel() for t in tensors.values()) == handle.num_trainable() + sum(b.numel() for b in buffers.values())

    torch.manual_seed(0)
    fresh = build_backbone(name).eval()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = forward_features(fresh, spec, batch)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert loaded.num_trainable() == handle.num_trainable()


def test_blip_base_parameter_counts_match_the_paper_shapes():
    """Released code: R³ + 1752·R + 36,864 = 125,696 at R=32; we add one gate per GQT block (24)
    and one for ICE."""
    with torch.device("meta"):
        model = build_backbone("blip-base-retrieval")
        handle = inject_aurora(model, AuroraConfig(rank=32, backbone="blip-base-retrieval"))
    report = handle.parameter_report()
    assert report["aurora"] == 32**3 + 1752 * 32 + 36_864 + 24 + 1 == 125_721
    assert report["backbone"] == 223_744_258
    assert round(report["aurora_percent"], 3) == 0.056
    handle.train_modules(["vision_proj", "text_proj", "itm_head"])
    assert handle.parameter_report()["heads"] == 2 * (768 * 256 + 256) + 768 * 2 + 2


# ---- bad input -------------------------------------------------------------------------------


def test_pattern_matching_nothing_lists_candidates():
    model = build_backbone("vit-tiny")
    with pytest.raises(ValueError, match=r"(?s)matches no nn.Linear.*blocks\.0\.attn\.qkv"):
        inject_aurora(model, AuroraConfig(targets=[r"blocks\.\d+\.nonexistent"]))


def test_layer_without_square_blocks_goes_between_widths():
    model = nn.Sequential(nn.Linear(10, 15), nn.ReLU(), nn.Linear(15, 10))
    handle = inject_aurora(model, AuroraConfig(targets=["0", "2"], rank=2))
    assert {k: f["parts"] for k, f in handle.describe()["factor_sets"].items()} == {"d10": ["down", "up"],
                                                                                     "d15": ["down", "up"]}
    assert handle.layers["0"].source.width == 10 and handle.layers["0"].target.width == 15


@pytest.mark.parametrize("bad", [{"rank": 0}, {"rank": -3}, {"ranks": {32: 0}}, {"dropout": 1.5}, {"targets": []},
                                 {"merged": "yes"}, {"merged": "on", "dropout": 0.1}])
def test_bad_config_values(bad):
    with pytest.raises(ValueError, match="AuroraConfig"):
        AuroraConfig(**bad)


def test_unknown_preset_and_unknown_key_and_double_injection():
    model = build_backbone("vit-tiny")
    with pytest.raises(ValueError, match="unknown target preset 'nope'"):
        inject_aurora(model, AuroraConfig(targets="nope", backbone="vit-tiny"))
    with pytest.raises(ValueError, match=r"unknown AuroraConfig keys \['rnak'\]"):
        AuroraConfig.from_dict({"rnak": 3})
    inject_aurora(model, AuroraConfig(backbone="vit-tiny"))
    with pytest.raises(ValueError, match="already has Aurora"):
        inject_aurora(model, AuroraConfig(backbone="vit-tiny"))


def test_unregistered_model_needs_explicit_patterns():
    with pytest.raises(ValueError, match="no target presets are registered for"):
        inject_aurora(nn.Sequential(nn.Linear(4, 4)), AuroraConfig())


def test_mismatched_adapters_are_refused(tmp_path):
    _, handle = _adapted("vit-tiny")
    handle.save(tmp_path / "a")
    with pytest.raises(ValueError, match=r"factor sets \{'d32': \{'parts': \['down', 'up'\], 'rank': 4.*the model has .*'rank': 8"):
        _, other = _adapted("vit-tiny", rank=8)
        other.load(tmp_path / "a")

    def rewrite(tensors):  # a consistent file (its digest recorded) that does not fit the model
        from aurora_ds.aurora.io import CONTENT_DIGEST, content_digest, file_digest

        save_file(tensors, str(tmp_path / "a" / "adapter.safetensors"))
        meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
        meta["files"]["adapter.safetensors"] = file_digest(tmp_path / "a" / "adapter.safetensors")
        meta[CONTENT_DIGEST] = content_digest(meta)
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))

    tensors = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    name = "blocks.0.attn.qkv.coeffs"
    tensors[name] = torch.zeros(4, 5)
    rewrite(tensors)
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \[4, 5\], the model expects \[4, 3\]"):
        load_adapter(build_backbone("vit-tiny"), tmp_path / "a")

    del tensors[name]
    rewrite(tensors)
    with pytest.raises(ValueError, match=rf"missing from the file \['{name}'\]"):
        load_adapter(build_backbone("vit-tiny"), tmp_path / "a")

    with pytest.raises(ValueError, match="adapts layers this model does not resolve to"):
        load_adapter(build_backbone("vit-base"), tmp_path / "a")


def test_missing_or_broken_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(build_backbone("vit-tiny"), tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="needs adapter_config.json"):
        load_adapter(build_backbone("vit-tiny"), tmp_path / "x")
    (tmp_path / "x" / "adapter_config.json").write_text("{not json")
    (tmp_path / "x" / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_adapter(build_backbone("vit-tiny"), tmp_path / "x")


def test_missing_backbone_checkpoint_and_unknown_backbone(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*nope.* does not exist"):
        build_backbone("blip-tiny-retrieval", checkpoint=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown backbone 'blip-huge'"):
        build_backbone("blip-huge")


def test_backbone_loads_from_local_checkpoint(tmp_path):
    torch.manual_seed(3)
    model = build_backbone("blip-tiny-retrieval")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_backbone("blip-tiny-retrieval", checkpoint=tmp_path / "ckpt")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_timm_tower_from_checkpoint_directory_and_in_bf16(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("eva-tiny")
    (tmp_path / "eva").mkdir()
    save_file(model.state_dict(), str(tmp_path / "eva" / "model.safetensors"))
    loaded = build_backbone("eva-tiny", checkpoint=tmp_path / "eva")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    half = build_backbone("eva-tiny", checkpoint=tmp_path / "eva", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the build's default dtype is restored
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        build_backbone("eva-tiny", checkpoint=tmp_path)


def test_adapted_layer_stays_at_its_path():
    model, handle = _adapted("blip-tiny-retrieval")
    layer = model.text_encoder.encoder.layer[0].crossattention.self.query
    assert isinstance(layer, AuroraLinear)
    assert handle.layers["text_encoder.encoder.layer.0.crossattention.self.query"] is layer
    assert len(handle.gated_query) == 4 and handle.context is not None


def test_adapter_file_format_does_not_import_the_model():
    """aurora/io.py is the file format alone; model.py uses it (no import cycle)."""
    import ast

    import aurora_ds.aurora.io as io

    tree = ast.parse(open(io.__file__).read())
    ours = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert ours == {"config"}
