"""The shared transformer (pretrain_nb.models): masking, norm placement, positions, heads and FLOP counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain_nb.core import PretrainNbError
from pretrain_nb.models import (
    GPT,
    GPT_SIZES,
    Block,
    Encoder,
    EncoderClassifier,
    MaskedLM,
    SelfAttention,
    TransformerConfig,
    TransformerSettings,
    ViT,
    ViTSettings,
    gather_tokens,
    random_masking,
    sincos_positions_2d,
    attention_mask,
    causal_lm_loss,
    block_norms,
    count_parameters,
    flops_per_token,
    matmul_parameters,
    patchify,
    unpatchify,
    vit_flops_per_image,
)

CFG = dict(vocab_size=37, block_size=12, d_model=32, n_layers=2, n_heads=4)


@pytest.mark.parametrize("pos", ["learned", "rotary", "none"])
@pytest.mark.parametrize("norm", ["pre", "post", "peri", "mix"])
def test_gpt_is_causal(pos, norm):
    torch.manual_seed(0)
    gpt = GPT(TransformerConfig(**CFG, pos=pos, norm=norm)).eval()
    idx = torch.randint(37, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 37
    a, b = gpt(idx), gpt(changed)
    assert a.shape == (2, 12, 37)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6), "future tokens changed past logits"
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_encoder_is_bidirectional_and_respects_padding():
    torch.manual_seed(0)
    enc = Encoder(TransformerConfig(**CFG)).eval()
    idx = torch.randint(37, (1, 12))
    pad = torch.ones(1, 12, dtype=torch.bool)
    pad[:, 9:] = False
    out = enc(idx, pad)
    junk = idx.clone()
    junk[:, 9:] = (junk[:, 9:] + 3) % 37
    assert torch.allclose(enc(junk, pad)[:, :9], out[:, :9], atol=1e-6), "padding changed real tokens"
    early = idx.clone()
    early[:, 8] = (early[:, 8] + 1) % 37
    assert not torch.allclose(enc(early, pad)[:, 0], out[:, 0]), (
        "a bidirectional encoder must see later tokens"
    )


def test_attention_mask():
    m = attention_mask(torch.tensor([[True, True, False]]), 3, causal=True)[0, 0]
    assert m.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert attention_mask(None, 3, causal=True) is None


def test_tied_weights_and_parameter_count():
    gpt = GPT(TransformerConfig(**CFG))
    assert gpt.head.weight is gpt.tok_emb.weight
    d, L, V, T = 32, 2, 37, 12
    per_layer = 12 * d * d + 2 * d  # qkv, proj, mlp weights + two LayerNorm weights (no biases)
    assert count_parameters(gpt) == V * d + T * d + L * per_layer + d  # + the final LayerNorm
    untied = GPT(TransformerConfig(**CFG, tie_weights=False))
    assert count_parameters(untied) == count_parameters(gpt) + V * d
    mlm = MaskedLM(TransformerConfig(**CFG))
    assert mlm.head.embedding.weight is mlm.encoder.tok_emb.weight


def test_flops_against_hand_calculation():
    cfg = TransformerConfig(vocab_size=100, block_size=64, d_model=16, n_layers=3, n_heads=2, mlp_ratio=4)
    n = 3 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16) + 16 * 100  # qkv, out, fc, proj per layer; the head
    assert matmul_parameters(cfg) == n
    assert flops_per_token(cfg, 64) == 6 * n + 12 * 3 * 64 * 16
    gpt = GPT(cfg)
    assert sum(m.weight.numel() for m in gpt.modules() if isinstance(m, nn.Linear)) == n


def test_vit_flops():
    vit = ViT(
        TransformerConfig(d_model=16, n_layers=1, n_heads=2),
        image_size=8,
        patch_size=4,
        pool="mean",
        class_token=False,
        n_classes=10,
    )
    T, d = 4, 16
    per_token = 6 * (12 * d * d + 16 * d) + 12 * 1 * T * d  # block weights + patch embedding (16 pixels -> d)
    assert vit_flops_per_image(vit) == T * per_token + 6 * d * 10


def _hand_layernorm(h, ln):
    "LayerNorm written out: centre, divide by the standard deviation (eps inside the root), scale."
    return (
        (h - h.mean(-1, keepdim=True))
        / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + ln.eps)
        * ln.weight
    )


def _hand_block(x, blk, norm):
    "The block written out by hand, with plain softmax attention and LayerNorm, to check Block."

    def attn(h):
        B, T, C = h.shape
        q, k, v = blk.attn.qkv(h).split(C, dim=2)
        q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / math.sqrt(C // 4)).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")
        )
        return blk.attn.proj((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))

    mlp = lambda h: blk.mlp.proj(torch.nn.functional.gelu(blk.mlp.fc(h)))
    ln = _hand_layernorm
    if norm == "pre":
        x = x + attn(ln(x, blk.ln1))
        return x + mlp(ln(x, blk.ln2))
    if norm == "post":
        x = ln(x + attn(x), blk.ln1)
        return ln(x + mlp(x), blk.ln2)
    x = x + ln(attn(ln(x, blk.ln1)), blk.ln1_out)
    return x + ln(mlp(ln(x, blk.ln2)), blk.ln2_out)


@pytest.mark.parametrize("norm", ["pre", "post", "peri"])
def test_block_computes_the_intended_function(norm):
    torch.manual_seed(0)
    blk = Block(TransformerConfig(d_model=32, n_heads=4, norm=norm)).eval()
    with torch.no_grad():  # LayerNorm gains away from 1, so that a norm applied in the wrong place shows
        for m in blk.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 32) * 3
    assert torch.allclose(blk(x), _hand_block(x, blk, norm), atol=1e-5)
    others = [n for n in ("pre", "post") if n != norm]
    assert not any(torch.allclose(blk(x), _hand_block(x, blk, n), atol=1e-3) for n in others)


def test_peri_ln_has_output_norms_and_post_ln_has_no_final_norm():
    peri = GPT(TransformerConfig(**CFG, norm="peri"))
    assert sum(isinstance(m, nn.LayerNorm) for m in peri.modules()) == 4 * CFG["n_layers"] + 1
    post = GPT(TransformerConfig(**CFG, norm="post"))
    assert isinstance(post.trunk.ln_f, nn.Identity) and isinstance(
        GPT(TransformerConfig(**CFG)).trunk.ln_f, nn.LayerNorm
    )


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, ["pre"] * 8),
        (0.25, ["post"] * 2 + ["pre"] * 6),
        (0.3, ["post"] * 2 + ["pre"] * 6),
        (0.5, ["post"] * 4 + ["pre"] * 4),
        (1.0, ["post"] * 8),
    ],
)
def test_mix_ln_puts_post_ln_in_the_first_floor_alpha_l_blocks(alpha, expected):
    cfg = TransformerConfig(**(CFG | dict(n_layers=8)), norm="mix", mix_post_fraction=alpha)
    assert block_norms(cfg) == expected
    assert [b.norm for b in GPT(cfg).trunk.blocks] == expected
    assert block_norms(TransformerConfig(**CFG, norm="peri")) == ["peri", "peri"]


@pytest.mark.parametrize("alpha, equivalent", [(0.0, "pre"), (1.0, "post")])
def test_mix_ln_at_the_ends_of_alpha_is_pre_or_post_ln(alpha, equivalent):
    torch.manual_seed(0)
    mix = GPT(TransformerConfig(**CFG, norm="mix", mix_post_fraction=alpha)).eval()
    torch.manual_seed(0)
    ref = GPT(TransformerConfig(**CFG, norm=equivalent)).eval()
    torch.manual_seed(0)
    other = GPT(TransformerConfig(**CFG, norm="post" if equivalent == "pre" else "pre")).eval()
    assert mix.state_dict().keys() == ref.state_dict().keys()
    idx = torch.randint(37, (2, 12))
    assert torch.equal(mix(idx), ref(idx))
    assert not torch.allclose(mix(idx), other(idx), atol=1e-3)


def test_wrong_norm_settings_name_what_is_allowed():
    with pytest.raises(PretrainNbError, match="valid placements are: pre, post, peri, mix"):
        TransformerConfig(norm="sandwich")
    with pytest.raises(PretrainNbError, match=r"mix_post_fraction must lie in \[0, 1\]"):
        TransformerConfig(norm="mix", mix_post_fraction=1.5)
    with pytest.raises(PretrainNbError, match="valid placements are: pre, post, peri"):
        Block(TransformerConfig(), norm="mix")


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 3, 12, 8)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3, 12, 8), x)
    img = torch.arange(16.0).view(1, 1, 4, 4)
    assert patchify(img, 2)[0, 1].tolist() == [2, 3, 6, 7]  # the second patch is the top-right 2x2
    with pytest.raises(PretrainNbError, match="not divisible"):
        patchify(torch.zeros(1, 1, 5, 5), 2)


@pytest.mark.parametrize("pool, class_token", [("cls", True), ("mean", True), ("mean", False)])
@pytest.mark.parametrize("positions", ["learned", "sincos", "none"])
def test_vit(pool, class_token, positions):
    vit = ViT(
        TransformerConfig(d_model=32, n_layers=1, n_heads=4),
        image_size=28,
        patch_size=7,
        channels=3,
        positions=positions,
        pool=pool,
        class_token=class_token,
        n_classes=5,
    )
    x = torch.rand(2, 3, 28, 28)
    assert vit(x).shape == (2, 5)
    assert vit.tokens(x).shape == (2, 16 + class_token, 32)
    assert vit.features(x).shape == (2, 32)
    encoder = ViT(TransformerConfig(d_model=32, n_layers=1, n_heads=4), channels=3, positions=positions)
    assert encoder(x).shape == (2, 17, 32)  # no head: the tokens


def test_vit_refuses_a_class_token_pool_without_a_class_token_and_unknown_choices():
    cfg = TransformerConfig(d_model=32, n_heads=4)
    with pytest.raises(PretrainNbError, match="pool='cls' reads the class token"):
        ViT(cfg, pool="cls", class_token=False)
    with pytest.raises(PretrainNbError, match="valid ViT position encodings are: learned, none, sincos"):
        ViT(cfg, positions="rotary")
    with pytest.raises(PretrainNbError, match="valid poolings are: cls, mean"):
        ViT(cfg, pool="max")


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masking_hides_exactly_round_ratio_n_per_sample_and_restore_inverts_the_shuffle(ratio):
    torch.manual_seed(0)
    N = 49
    keep, mask, restore = random_masking(64, N, ratio)
    assert (mask.sum(1) == round(ratio * N)).all() and keep.shape == (64, N - round(ratio * N))
    assert not mask.gather(1, keep).any()  # the kept patches are exactly the unmasked ones
    assert torch.equal(torch.sort(keep, 1).values, torch.stack([(~m).nonzero().flatten() for m in mask]))
    shuffle = restore.argsort(1)
    ids = torch.arange(N).expand(64, N)
    assert torch.equal(ids.gather(1, shuffle).gather(1, restore), ids)
    assert len({tuple(k.tolist()) for k in keep}) > 60  # per-sample masks, not one mask for the batch


def test_masking_rejects_ratios_that_leave_nothing_or_are_out_of_range():
    for bad in (1.0, -0.1):
        with pytest.raises(PretrainNbError, match=r"mask_ratio must lie in \[0, 1\)"):
            random_masking(2, 16, bad)
    with pytest.raises(PretrainNbError, match="leaves no visible patch"):
        random_masking(2, 16, 0.99)


def test_patchify_round_trip_for_the_mim_patch_sizes():
    x = torch.rand(2, 3, 28, 28)
    for p in (4, 7, 14):
        assert torch.equal(unpatchify(patchify(x, p), p, 3, 28, 28), x)


@pytest.mark.parametrize("positions", ["learned", "sincos"])
def test_positions_travel_with_their_patches(positions):
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_layers=2, n_heads=4)
    enc = ViT(cfg, positions=positions).eval()
    x = torch.rand(2, 1, 28, 28)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    full, shuffled = enc(x), enc(x, keep=perm)
    # attention is permutation-equivariant, so a patch keeps its output wherever it sits in the sequence,
    # which holds only if its grid position was added before the reordering
    assert torch.allclose(shuffled[:, 1:], gather_tokens(full[:, 1:], perm), atol=1e-5)
    assert torch.allclose(shuffled[:, 0], full[:, 0], atol=1e-5)
    no_pos = ViT(cfg, positions="none").eval()
    no_pos.load_state_dict(enc.state_dict(), strict=False)  # a learned table is the one extra weight
    hidden = enc(x, keep=perm, hide_positions=torch.ones(2, 16, dtype=torch.bool))
    if (
        positions == "sincos"
    ):  # without positions the class token differs only where a learned one has its own
        assert torch.allclose(hidden, no_pos(x, keep=perm), atol=1e-5)
    assert not torch.allclose(hidden, shuffled, atol=1e-3)


def test_sincos_positions_are_distinct_and_need_a_width_divisible_by_four():
    pos = sincos_positions_2d(4, 32)
    assert pos.shape == (16, 32) and torch.cdist(pos, pos).add(torch.eye(16) * 9).min() > 0.1
    with pytest.raises(PretrainNbError, match="divisible by 4"):
        sincos_positions_2d(4, 30)


def test_a_fixed_position_table_is_not_a_weight_and_a_learned_one_is():
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=4)
    assert "positions.table" not in ViT(cfg, positions="sincos").state_dict()
    assert (
        ViT(cfg, positions="learned").state_dict()["positions.table"].shape[1] == 128
    )  # cfg.block_size rows


def test_encoder_classifier_puts_a_new_head_on_the_mean_patch_token():
    torch.manual_seed(0)
    enc = ViT(TransformerConfig(d_model=32, n_layers=1, n_heads=4), positions="sincos").eval()
    clf = EncoderClassifier(enc, n_classes=3)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(clf(x), clf.head(enc(x)[:, 1:].mean(1)), atol=1e-6)


def test_run_settings_build_their_models():
    settings = ViTSettings(d_model=32, n_heads=4, n_layers=1)
    assert settings.vit(28, 1).trunk.blocks[0].attn.qkv.in_features == 32
    cfg = TransformerSettings().transformer_config(vocab_size=50, block_size=16)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.vocab_size) == (64, 3, 4, 50)


def test_config_errors():
    with pytest.raises(PretrainNbError, match="divisible by n_heads"):
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(PretrainNbError, match="exceeds block_size"):
        GPT(TransformerConfig(**CFG))(torch.zeros(1, 13, dtype=torch.long))


def test_reference_sizes():
    sizes = {k: count_parameters(GPT(TransformerConfig(**v))) for k, v in GPT_SIZES.items()}
    assert 0.15e6 < sizes["0.2M"] < 0.25e6 and 0.9e6 < sizes["1M"] < 1.2e6 and 5.5e6 < sizes["6M"] < 6.5e6


def test_causal_lm_loss_shifts():
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = 0
    logits[0, 1, 3] = 0
    assert causal_lm_loss(logits, torch.tensor([[0, 2, 3]])).item() < 1e-3


@pytest.mark.parametrize("shape", [(4, 17, 50), (32, 128, 2048)])
def test_causal_lm_loss_has_the_gradient_of_the_sliced_loss_exactly(shape):
    "Shifted targets instead of sliced logits: the same gradient, bit for bit, and the value within 1e-6."
    B, T, V = shape
    torch.manual_seed(0)
    logits = torch.randn(B, T, V, requires_grad=True)
    idx = torch.randint(V, (B, T))
    sliced = F.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    (expected,) = torch.autograd.grad(sliced, logits)
    loss = causal_lm_loss(logits, idx)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, expected)
    assert abs(loss.item() - sliced.item()) <= 1e-6 * abs(sliced.item())


def test_causal_lm_loss_ignores_the_ignore_index_in_the_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    idx = torch.randint(10, (2, 6))
    padded = idx.clone()
    padded[:, 4:] = -100  # the last two tokens are padding: nothing predicts them
    expected = F.cross_entropy(logits[:, :3].reshape(-1, 10), idx[:, 1:4].reshape(-1))
    assert torch.allclose(causal_lm_loss(logits, padded), expected, atol=1e-6)


def test_attention_splits_the_projection_like_a_permuted_view():
    "The split-and-view attention computes what the permuted five-dimensional view computed."
    torch.manual_seed(0)
    attn = SelfAttention(TransformerConfig(d_model=32, n_heads=4))
    x = torch.randn(3, 8, 32)
    B, T, C = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, 4, 8).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    assert torch.equal(attn(x), attn.proj(y))
