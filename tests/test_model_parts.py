"""Model parts on their own: the connector (token reduction, MLP projector, placeholder merge), the
losses (`lm_loss` against a hand computation with IGNORE_INDEX, `info_nce` with groups) and the
BERT-style text encoder (masks, padding, pooling, the HF-tokenizer entry point). Complements
tests/test_model.py, which tests them inside a VLM."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitune.config import ConnectorConfig, TextConfig
from vitune.conventions import IGNORE_INDEX
from vitune.model.connector import (
    build_connector,
    merge_image_embeddings,
    reduce_tokens,
)
from vitune.model.losses import info_nce, lm_loss
from vitune.model.text_encoder import TextEncoder, embed_texts, mean_pool

pytestmark = pytest.mark.usefixtures("one_thread")

# -- connector ---------------------------------------------------------------------------------------


def grid_tokens(B=2, g=6, D=3):
    return torch.randn(B, g * g, D, generator=torch.Generator().manual_seed(0))


def test_reductions_map_each_2x2_block_to_one_token():
    x, g = grid_tokens(), 6
    pooled, shuffled = reduce_tokens(x, "pool2x2"), reduce_tokens(x, "pixel_shuffle2x2")
    assert pooled.shape == (2, 9, 3) and shuffled.shape == (2, 9, 12)
    for i in range(g // 2):
        for j in range(g // 2):
            cells = [(2 * i + di) * g + 2 * j + dj for di in (0, 1) for dj in (0, 1)]  # row-major 2x2 block
            t = i * (g // 2) + j
            assert torch.equal(shuffled[:, t], x[:, cells].flatten(1))
            assert torch.allclose(pooled[:, t], x[:, cells].mean(1), atol=1e-6)


def test_no_reduction_and_unknown_reduction():
    x = grid_tokens()
    assert reduce_tokens(x, "none") is x
    with pytest.raises(ValueError, match="unknown token reduction 'pool3x3'; valid: none, pool2x2, pixel_shuffle2x2"):
        reduce_tokens(x, "pool3x3")


@pytest.mark.parametrize("reduce, hidden, n_out, d_in", [
    ("none", 0, 36, 16), ("pool2x2", 0, 9, 16), ("pixel_shuffle2x2", 0, 9, 64), ("none", 24, 36, 16)])
def test_projector_shapes_and_parameter_count(reduce, hidden, n_out, d_in):
    proj = build_connector(ConnectorConfig(reduce=reduce, hidden_dim=hidden), vision_dim=16, lm_dim=40, n_vision_tokens=36)
    h = hidden or 40  # 0: the LM's width
    assert proj.num_tokens(36) == n_out
    assert proj(torch.randn(2, 36, 16)).shape == (2, n_out, 40)
    assert sum(p.numel() for p in proj.parameters()) == d_in * h + h + h * 40 + 40


def test_unknown_connector_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown connector 'qformer'; valid: \['mlp'\]"):
        build_connector(ConnectorConfig(kind="qformer"), 16, 40, 36)


def test_merge_fills_placeholders_in_row_major_order_across_the_batch():
    text = torch.zeros(2, 5, 2)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    images = torch.arange(8, dtype=torch.bfloat16).view(2, 2, 2) + 1  # image 0 -> row 0, image 1 -> row 1
    out = merge_image_embeddings(text, images, mask)
    assert out.dtype == torch.float32 and text.abs().sum() == 0  # cast to the text's dtype; input untouched
    assert out[0, 1:3].tolist() == [[1, 2], [3, 4]] and out[1, :2].tolist() == [[5, 6], [7, 8]]
    assert out[~mask].abs().sum() == 0


# -- losses ------------------------------------------------------------------------------------------

def hand_lm_loss(hidden, labels, weight):
    """Plain loops: position t predicts labels[t + 1] unless that label is IGNORE_INDEX."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            logits = [sum(hidden[b, t, d].item() * weight[v, d].item() for d in range(weight.shape[1]))
                      for v in range(weight.shape[0])]
            lse = max(logits) + math.log(sum(math.exp(z - max(logits)) for z in logits))
            total, n = total + lse - logits[y], n + 1
    return total, n


@pytest.fixture
def lm_case():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 6, 4, generator=g), torch.randn(7, 4, generator=g)
    labels = torch.tensor([[3, IGNORE_INDEX, 1, 6, IGNORE_INDEX, 2],
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0, 5, IGNORE_INDEX]])
    return hidden, labels, weight


def test_lm_loss_equals_a_hand_computation(lm_case):
    hidden, labels, weight = lm_case
    total, n = hand_lm_loss(hidden, labels, weight)
    assert n == 5  # labels[:, 0] is never a target; IGNORE_INDEX never is
    loss, n_here = lm_loss(hidden, labels, weight)
    assert n_here == 5 and loss.item() == pytest.approx(total / 5, rel=1e-5)
    loss, n_here = lm_loss(hidden, labels, weight, n_targets=20)  # the accumulated batch's count divides
    assert n_here == 5 and loss.item() == pytest.approx(total / 20, rel=1e-5)


def test_lm_loss_ignores_positions_without_a_target_exactly(lm_case):
    hidden, labels, weight = lm_case
    base = lm_loss(hidden, labels, weight)[0]
    changed = hidden.clone()
    changed[0, 0] += 100.0  # predicts labels[0, 1], which is ignored
    changed[:, -1] += 100.0  # the last position predicts nothing
    changed[1, :2] += 100.0
    assert torch.equal(lm_loss(changed, labels, weight)[0], base)
    changed[0, 1] += 1.0  # predicts labels[0, 2] = 1: a target
    assert not torch.equal(lm_loss(changed, labels, weight)[0], base)


def test_lm_loss_without_targets_is_zero_with_zero_gradients():
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    loss, n = lm_loss(hidden, torch.full((1, 4), IGNORE_INDEX), torch.randn(5, 3))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_equals_a_hand_computation():
    image, text, scale = unit(3, 4, seed=2), unit(3, 4, seed=3), torch.tensor(5.0)
    s = (scale * image @ text.T).tolist()

    def ce(rows):  # mean over i of -log softmax(rows[i])[i]
        return sum(math.log(sum(math.exp(z) for z in r)) - r[i] for i, r in enumerate(rows)) / len(rows)

    cols = [list(c) for c in zip(*s)]
    assert info_nce(image, text, scale).item() == pytest.approx(0.5 * (ce(s) + ce(cols)), rel=1e-5)
    assert info_nce(text, image, scale).item() == pytest.approx(info_nce(image, text, scale).item(), rel=1e-6)


def test_info_nce_groups_are_neither_negatives_nor_targets():
    image, text, scale = unit(4, 4, seed=4), unit(4, 4, seed=5), torch.tensor(3.0)
    groups = torch.tensor([0, 0, 1, 2])  # rows 0 and 1: two captions of one image
    got = info_nce(image, text, scale, groups)
    logits = scale * image @ text.T
    logits[0, 1] = logits[1, 0] = float("-inf")
    want = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert torch.allclose(got, want) and got.item() != pytest.approx(info_nce(image, text, scale).item())
    assert torch.allclose(info_nce(image, text, scale, torch.arange(4)), info_nce(image, text, scale))


# -- text encoder ------------------------------------------------------------------------------------

CFG = TextConfig(vocab_size=30, dim=16, layers=2, heads=2, ffn_dim=32, max_positions=8, max_len=8)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(CFG).eval()


def test_parameter_names_follow_hf_bert(encoder):
    names = set(dict(encoder.named_parameters()))
    assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
            "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.output.dense.bias",
            "encoder.layer.1.attention.output.LayerNorm.weight", "encoder.layer.1.intermediate.dense.weight",
            "encoder.layer.1.output.dense.weight", "encoder.layer.1.output.LayerNorm.bias"} <= names
    assert not any("pooler" in n for n in names) and not any(".layer.2." in n for n in names)


@torch.no_grad()
def test_padding_does_not_change_the_real_tokens(encoder):
    ids = torch.tensor([[5, 6, 7]])
    padded, mask = torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
    assert encoder(ids).shape == (1, 3, 16)
    assert torch.allclose(encoder(padded, mask)[:, :3], encoder(ids), atol=1e-5)
    assert torch.allclose(encoder.embed(padded, mask), encoder.embed(ids), atol=1e-5)
    assert not torch.allclose(encoder.embed(padded), encoder.embed(ids), atol=1e-3)  # unmasked padding counts


def test_too_many_tokens_is_a_clear_error(encoder):
    with pytest.raises(ValueError, match="9 tokens exceed the encoder's 8 positions"):
        encoder(torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize("normalize", [True, False])
@torch.no_grad()
def test_embed_is_the_masked_mean_optionally_normalised(normalize):
    torch.manual_seed(0)
    enc = TextEncoder(TextConfig(**{**CFG.__dict__, "normalize": normalize, "act": "relu"})).eval()
    ids, mask = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hidden = enc(ids, mask)
    want = torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    want = F.normalize(want, dim=-1) if normalize else want
    assert torch.allclose(enc.embed(ids, mask), want, atol=1e-6)


def test_mean_pool_of_an_all_masked_row_is_zero_not_nan():
    pooled = mean_pool(torch.randn(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    assert torch.isfinite(pooled).all() and pooled[1].abs().sum() == 0


def test_embed_texts_pads_a_batch_like_one_by_one(encoder):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "a", "red", "circle", "left", "of", "blue"])}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    tk.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = ["a red circle left of", "blue", "red zebra"]
    batch = embed_texts(encoder, tk, texts)
    assert batch.shape == (3, 16) and torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-5)
    for text, row in zip(texts, batch):
        assert torch.allclose(row, embed_texts(encoder, tk, [text])[0], atol=1e-5)
