"""torch_nystrom.swap_nystromformer_attention against Hugging Face transformers' Nystromformer models.

Randomly initialised tiny models, float32, compared with the unmodified transformers model.

About masks: transformers 5.x hands each layer a (B, 1, L, S) additive mask, which its own Nyström
path adds to the (B, H, m, S) landmark scores: a RuntimeError whenever there is padding and
num_landmarks != segment_means_seq_len. transformers 4.x passed a (B, 1, 1, S) mask there, i.e. the
key padding added to every landmark row. `hf_key_padding_masks()` makes transformers do that again
(the mask rows of a padding mask are all equal, so this changes nothing where 5.x works: checked in
test_key_padding_patch_is_neutral), and the masked Nyström-path tests compare with that.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from helpers import rel_err
from reference import landmarks, max_column_sum, newton_schulz

torch_nystrom = pytest.importorskip("torch_nystrom")
transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.nystromformer.modeling_nystromformer")
from transformers import (  # noqa: E402
    NystromformerConfig,
    NystromformerForMaskedLM,
    NystromformerForSequenceClassification,
    NystromformerModel,
)

from torch_nystrom.hf import NystromformerSelfAttentionOps  # noqa: E402

TOL = 1e-5
VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# name: (hidden, heads, num_landmarks, segment_means_seq_len, conv_kernel_size or None)
CONFIGS = {
    "h32_m4_conv3": (32, 2, 4, 16, 3),
    "h64_m8_noconv": (64, 4, 8, 64, None),
    "h48_m8_conv65": (48, 3, 8, 32, 65),
    "exact_m16_conv3": (32, 4, 16, 16, 3),  # num_landmarks == segment_means_seq_len: exact attention
}
MODEL_CLASSES = {
    "base": NystromformerModel,
    "mlm": NystromformerForMaskedLM,
    "seqcls": NystromformerForSequenceClassification,
}


def make_config(hidden, heads, m, seq, conv, dropout=0.0):
    return NystromformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=2,
        intermediate_size=2 * hidden,
        num_landmarks=m,
        segment_means_seq_len=seq,
        conv_kernel_size=conv if conv is not None else 3,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=3,
    )


def make_pair(cls, spec, seed=0, dropout=0.0):
    """(transformers model, swapped deep copy), eval mode."""
    hidden, heads, m, seq, conv = spec
    torch.manual_seed(seed)
    model = cls(make_config(hidden, heads, m, seq, conv, dropout)).eval()
    if conv is None:
        # transformers' config refuses conv_kernel_size=None; switch the conv off on the layers instead.
        for mod in model.modules():
            if isinstance(mod, modeling.NystromformerSelfAttention):
                mod.conv_kernel_size = None
                del mod.conv
    swapped = torch_nystrom.swap_nystromformer_attention(copy.deepcopy(model))
    return model, swapped


def inputs(batch, n, pad_lengths=None, seed=1):
    """input_ids (batch, n) and an attention_mask (1 = token) with trailing padding of pad_lengths[b]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, n), generator=g)
    if pad_lengths is None:
        return ids, None
    mask = torch.ones(batch, n, dtype=torch.long)
    for b, p in enumerate(pad_lengths):
        if p:
            mask[b, n - p :] = 0
    return ids, mask


@contextlib.contextmanager
def hf_key_padding_masks():
    """Make transformers pass the (B, 1, 1, S) key-padding mask of transformers 4.x to its layers."""
    original = modeling.create_bidirectional_mask

    def first_row(*args, **kwargs):
        mask = original(*args, **kwargs)
        return None if mask is None else mask[:, :, :1, :]

    modeling.create_bidirectional_mask = first_row
    try:
        yield
    finally:
        modeling.create_bidirectional_mask = original


def self_attention_outputs(model):
    """Forward hooks recording every self-attention layer's context output, in layer order."""
    records = []
    handles = [
        mod.register_forward_hook(lambda _m, _i, out: records.append(out[0].detach()))
        for mod in model.modules()
        if isinstance(mod, (modeling.NystromformerSelfAttention, NystromformerSelfAttentionOps))
    ]
    return records, handles


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_both(model, swapped, ids, mask, key_padding_patch):
    """Outputs and per-layer attention contexts of both models (transformers first)."""
    rec_hf, h1 = self_attention_outputs(model)
    rec_sw, h2 = self_attention_outputs(swapped)
    try:
        with torch.no_grad():
            with hf_key_padding_masks() if key_padding_patch else contextlib.nullcontext():
                expected = main_output(model(ids, attention_mask=mask))
            out = main_output(swapped(ids, attention_mask=mask))
    finally:
        for h in h1 + h2:
            h.remove()
    return out, expected, rec_sw, rec_hf


def assert_same(out, expected, rec_sw, rec_hf, tol=TOL):
    assert out.shape == expected.shape
    err = rel_err(out, expected)
    assert err <= tol, f"model output: relative error vs transformers {err:.3e} > {tol:.0e}"
    assert len(rec_sw) == len(rec_hf) > 0
    for i, (a, b) in enumerate(zip(rec_sw, rec_hf)):
        err = rel_err(a, b)
        assert err <= tol, f"self-attention {i}: relative error vs transformers {err:.3e} > {tol:.0e}"


# ----------------------------------------------------------------------------- the main parity test


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("cls_name", list(MODEL_CLASSES))
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_swapped_model_matches_transformers(cfg_name, cls_name, masked):
    spec = CONFIGS[cfg_name]
    model, swapped = make_pair(MODEL_CLASSES[cls_name], spec)
    seq = spec[3]
    ids, mask = inputs(3, seq, [0, 5, seq // 2] if masked else None)
    exact_config = spec[2] == spec[3]
    # transformers' own masked Nyström path fails in 5.x (see the module docstring): compare with 4.x's masking.
    out, expected, rec_sw, rec_hf = run_both(model, swapped, ids, mask, key_padding_patch=masked and not exact_config)
    assert_same(out, expected, rec_sw, rec_hf)
    if masked:
        # The padding changes the real tokens' outputs (the mask is not silently dropped) ...
        with torch.no_grad():
            unmasked = main_output(swapped(ids))
        assert rel_err(unmasked[2], out[2]) > 1e-4
        # ... and the unpadded sequence is untouched by the padding of the others (the landmarks and A, hence
        # even the batch-wide "original" c, do not depend on the mask).
        assert rel_err(unmasked[0], out[0]) <= TOL
    if masked and not exact_config:
        # Where unmodified transformers manages a padded batch, it must agree too.
        try:
            with torch.no_grad():
                direct = main_output(model(ids, attention_mask=mask))
        except RuntimeError as e:
            assert "must match the size" in str(e)
        else:
            assert rel_err(out, direct) <= TOL


def test_key_padding_patch_is_neutral():
    """The (B,1,1,S) mask equals transformers 5.x's own (B,1,L,S) mask where 5.x works (exact path)."""
    model, _ = make_pair(NystromformerModel, CONFIGS["exact_m16_conv3"])
    ids, mask = inputs(3, 16, [0, 5, 8])
    with torch.no_grad():
        direct = model(ids, attention_mask=mask).last_hidden_state
        with hf_key_padding_masks():
            patched = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(direct, patched)


def test_fully_padded_sequence():
    """A sequence that is all padding: transformers' softmax over dtype-min scores is uniform over all keys."""
    for spec, patch in ((CONFIGS["h32_m4_conv3"], True), (CONFIGS["exact_m16_conv3"], False)):
        model, swapped = make_pair(NystromformerModel, spec)
        ids, mask = inputs(3, spec[3], [0, 3, spec[3]])
        out, expected, rec_sw, rec_hf = run_both(model, swapped, ids, mask, key_padding_patch=patch)
        assert_same(out, expected, rec_sw, rec_hf)


def test_output_attentions():
    for spec, n, pads, patch in (
        (CONFIGS["h32_m4_conv3"], 16, None, False),
        (CONFIGS["h32_m4_conv3"], 16, [0, 4], True),
        (CONFIGS["exact_m16_conv3"], 20, [0, 4], False),
    ):
        model, swapped = make_pair(NystromformerModel, spec)
        ids, mask = inputs(2, n, pads)
        with torch.no_grad():
            with hf_key_padding_masks() if patch else contextlib.nullcontext():
                expected = model(ids, attention_mask=mask, output_attentions=True)
            out = swapped(ids, attention_mask=mask, output_attentions=True)
        assert rel_err(out.last_hidden_state, expected.last_hidden_state) <= TOL
        assert len(out.attentions) == len(expected.attentions) == 2
        for a, b in zip(out.attentions, expected.attentions):
            assert a.shape == b.shape
            assert rel_err(a, b) <= TOL


def test_per_head_pinv_init():
    """A layer whose init_option is not "original" (transformers' exact coefficient) uses the per-head c."""
    spec = CONFIGS["h32_m4_conv3"]
    torch.manual_seed(0)
    model = NystromformerModel(make_config(*spec)).eval()
    for mod in model.modules():
        if isinstance(mod, modeling.NystromformerSelfAttention):
            mod.init_option = "exact"
    swapped = torch_nystrom.swap_nystromformer_attention(copy.deepcopy(model))
    assert all(m.pinv_init == "per_head" for m in swapped.modules() if isinstance(m, NystromformerSelfAttentionOps))
    for pads in (None, [0, 5, 2]):
        ids, mask = inputs(3, 16, pads)
        assert_same(*run_both(model, swapped, ids, mask, key_padding_patch=pads is not None))


def test_landmarks_equal_tokens_on_transformers_valid_path():
    """m=8, segment_means_seq_len=12, n=8: transformers' reshape is valid (one token per segment), so its
    Nyström formula F Z Bm v (not exact attention) is reproduced."""
    spec = (32, 2, 8, 12, 3)
    model, swapped = make_pair(NystromformerModel, spec)
    for pads in (None, [0, 3]):
        ids, mask = inputs(2, 8, pads)
        assert_same(*run_both(model, swapped, ids, mask, key_padding_patch=pads is not None))


# ----------------------------------------------------------------------------- lengths transformers cannot do


def test_exact_configuration_at_other_lengths():
    """num_landmarks == segment_means_seq_len: transformers computes exact attention at any length; so does the swap."""
    model, swapped = make_pair(NystromformerForMaskedLM, CONFIGS["exact_m16_conv3"])
    for n, pads in ((24, [0, 7]), (9, [2, 0]), (40, None)):
        ids, mask = inputs(2, n, pads)
        assert_same(*run_both(model, swapped, ids, mask, key_padding_patch=False))


def test_other_length_divisible_matches_transformers_at_that_length():
    """At n != segment_means_seq_len (m | n) transformers mixes batch elements or fails; the swap computes
    Nyström attention on the actual length, which is transformers' model with segment_means_seq_len = n."""
    model, swapped = make_pair(NystromformerModel, CONFIGS["h32_m4_conv3"])
    resized = copy.deepcopy(model)
    for n in (24, 40):
        for mod in resized.modules():
            if isinstance(mod, modeling.NystromformerSelfAttention):
                mod.seq_len = n
        for pads in (None, [0, 6, 11]):
            ids, mask = inputs(3, n, pads)
            assert_same(*run_both(resized, swapped, ids, mask, key_padding_patch=pads is not None))


def hf_semantics_reference(layer, x, pad):
    """float64 reference of what the swapped layer computes at any length (see its docstring)."""
    B, n, _ = x.shape
    H, d, m = layer.num_attention_heads, layer.attention_head_size, layer.num_landmarks

    def heads(lin):
        w, b = lin.weight.double(), lin.bias.double()
        return (x.double() @ w.T + b).view(B, n, H, d).transpose(1, 2)

    s = d ** -0.25
    q, k, v = heads(layer.query) * s, heads(layer.key) * s, heads(layer.value)
    neg = torch.zeros(B, 1, 1, n, dtype=torch.float64)
    if pad is not None:
        neg = neg.masked_fill(pad[:, None, None, :], torch.finfo(torch.float64).min)
    segment = layer.seq_len // m
    if m == layer.seq_len or (n <= m and not (segment >= 1 and n == m * segment)):
        out = torch.softmax(q @ k.transpose(-1, -2) + neg, dim=-1) @ v
    else:
        ql = landmarks(q.reshape(B * H, n, d), m).view(B, H, m, d)
        kl = landmarks(k.reshape(B * H, n, d), m).view(B, H, m, d)
        a = torch.softmax(ql @ kl.transpose(-1, -2), dim=-1)
        cs = max_column_sum(a.reshape(B * H, m, m))
        c = cs.max() if layer.pinv_init == "original" else cs
        z = newton_schulz(a.reshape(B * H, m, m), c, 6).view(B, H, m, m)
        f = torch.softmax(q @ kl.transpose(-1, -2), dim=-1)
        bm = torch.softmax(ql @ k.transpose(-1, -2) + neg, dim=-1)
        out = f @ (z @ (bm @ v))
    if layer.conv_kernel_size is not None:
        out = out + torch.nn.functional.conv2d(
            v, layer.conv.weight.double(), padding=(layer.conv_kernel_size // 2, 0), groups=H
        )
    return out.transpose(1, 2).reshape(B, n, H * d)


@pytest.mark.parametrize("n", [22, 13, 3], ids=["n22_m4_unequal_segments", "n13", "n3_below_m"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
def test_other_lengths_against_reference(n, masked):
    """Lengths where transformers fails: floor segments over all tokens (n > m), exact attention (n <= m)."""
    _, swapped = make_pair(NystromformerModel, CONFIGS["h32_m4_conv3"])
    layer = swapped.encoder.layer[0].attention.self
    assert isinstance(layer, NystromformerSelfAttentionOps)
    torch.manual_seed(3)
    x = torch.randn(3, n, 32)
    pad = None
    if masked:
        pad = torch.zeros(3, n, dtype=torch.bool)
        pad[1, n - 2 :] = True
        pad[2, n // 2 + 1 :] = True
    add_mask = None
    if pad is not None:
        add_mask = torch.zeros(3, 1, n, n).masked_fill(pad[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = layer(x, add_mask)[0]
    expected = hf_semantics_reference(layer, x, pad)
    err = rel_err(out, expected)
    assert err <= TOL, f"relative error vs float64 reference {err:.3e}"


def test_mask_semantics_differ_from_the_ops_masks():
    """Negative control: the op's own masks (padding removed from the landmarks too) are not transformers'
    semantics, which is why the padded Nyström path is a composition."""
    _, swapped = make_pair(NystromformerModel, CONFIGS["h32_m4_conv3"])
    layer = swapped.encoder.layer[0].attention.self
    layer.conv_kernel_size = None  # compare attention only
    x = 4 * torch.randn(2, 16, 32)  # peaked attention
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, 10:] = True
    add_mask = torch.zeros(2, 1, 16, 16).masked_fill(pad[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = layer(x, add_mask)[0]
        q = layer.query(x).view(2, 16, 2, 16).transpose(1, 2)
        k = layer.key(x).view(2, 16, 2, 16).transpose(1, 2)
        v = layer.value(x).view(2, 16, 2, 16).transpose(1, 2)
        ops = torch_nystrom.nystrom_attention(q, k, v, 4, pinv_init="original", key_padding_mask=pad)
    ops = ops.transpose(1, 2).reshape(2, 16, 32)
    assert rel_err(out[1, :10], ops[1, :10]) > 1e-3


# ----------------------------------------------------------------------------- weights, training, API


def test_state_dict_unchanged():
    for spec in (CONFIGS["h32_m4_conv3"], CONFIGS["h64_m8_noconv"]):
        torch.manual_seed(0)
        model = NystromformerForSequenceClassification(make_config(*spec)).eval()
        if spec[4] is None:
            for mod in model.modules():
                if isinstance(mod, modeling.NystromformerSelfAttention):
                    mod.conv_kernel_size = None
                    del mod.conv
        before = {k: v.clone() for k, v in model.state_dict().items()}
        queries = [mod.query for mod in model.modules() if isinstance(mod, modeling.NystromformerSelfAttention)]
        swapped = torch_nystrom.swap_nystromformer_attention(model)
        assert swapped is model
        after = swapped.state_dict()
        assert list(after) == list(before)
        for key, value in before.items():
            assert torch.equal(after[key], value), key
        layers = [mod for mod in swapped.modules() if isinstance(mod, NystromformerSelfAttentionOps)]
        assert len(layers) == 2
        assert not any(isinstance(mod, modeling.NystromformerSelfAttention) for mod in swapped.modules())
        assert all(a.query is b for a, b in zip(layers, queries))  # the very same modules
        swapped.load_state_dict(before, strict=True)
        # Idempotent.
        assert list(torch_nystrom.swap_nystromformer_attention(swapped).state_dict()) == list(before)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
def test_training_mode_dropout_and_gradients(masked):
    """train(): same dropout draws (transformers applies no attention-probability dropout in this layer),
    same loss and same gradients."""
    model, swapped = make_pair(NystromformerForMaskedLM, CONFIGS["h32_m4_conv3"], dropout=0.1)
    model.train()
    swapped.train()
    ids, mask = inputs(3, 16, [0, 4, 9] if masked else None)
    labels = ids.clone()
    results = []
    for net, patch in ((model, masked), (swapped, False)):
        torch.manual_seed(11)
        with hf_key_padding_masks() if patch else contextlib.nullcontext():
            out = net(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}))
    (logits_hf, grads_hf), (logits_sw, grads_sw) = results
    assert rel_err(logits_sw, logits_hf) <= TOL
    assert grads_sw.keys() == grads_hf.keys()
    # Relative to each tensor's own scale, except for gradients that are zero up to rounding (the key bias
    # shifts every score of a softmax row equally): those relative to the largest gradient of the model.
    floor = 1e-3 * max(g.abs().max().item() for g in grads_hf.values())
    for key in grads_hf:
        a, e = grads_sw[key].double(), grads_hf[key].double()
        err = (a - e).abs().max().item() / max(e.abs().max().item(), floor)
        assert err <= 1e-4, f"grad {key}: relative error {err:.3e}"
    # Dropout really was active: a different seed gives different logits.
    torch.manual_seed(12)
    with torch.no_grad():
        other = swapped(ids, attention_mask=mask).logits
    assert rel_err(other, logits_sw) > 1e-3


def test_swap_errors_and_layer():
    with pytest.raises(ValueError, match="holds no transformers NystromformerSelfAttention"):
        torch_nystrom.swap_nystromformer_attention(torch.nn.Linear(2, 2))
    model, _ = make_pair(NystromformerModel, CONFIGS["h32_m4_conv3"])
    hf_layer = model.encoder.layer[0].attention.self
    layer = torch_nystrom.swap_nystromformer_attention(hf_layer)
    assert isinstance(layer, NystromformerSelfAttentionOps) and layer.key is hf_layer.key
    x = torch.randn(2, 16, 32)
    soft = torch.zeros(2, 1, 16, 16)
    soft[..., 3] = -1.0
    with pytest.raises(ValueError, match="large negative"):
        layer(x, soft)
    per_query = torch.zeros(2, 1, 16, 16)
    per_query[:, :, 0, 5] = torch.finfo(torch.float32).min
    with pytest.raises(ValueError, match="key-padding mask"):
        layer(x, per_query)
    # A bool mask (transformers' convention: True = attend) is the same as the additive one.
    keep = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    keep[1, ..., 12:] = False
    additive = torch.zeros(2, 1, 16, 16).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        assert torch.equal(layer(x, keep)[0], layer(x, additive)[0])


def test_swapped_model_compiles_fullgraph():
    """The swapped model traces into one graph (the mask checks are skipped while compiling)."""
    _, swapped = make_pair(NystromformerModel, CONFIGS["h32_m4_conv3"])
    torch._dynamo.reset()
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)
    try:
        for pads in (None, [0, 6, 9]):
            ids, mask = inputs(3, 16, pads)
            with torch.no_grad():
                expected = swapped(ids, attention_mask=mask).last_hidden_state
                out = compiled(ids, attention_mask=mask).last_hidden_state
            assert rel_err(out, expected) <= TOL
    finally:
        torch._dynamo.reset()
