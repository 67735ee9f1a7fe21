"""Instruction-visual alignment: InfoNCE against a hand computation, gradients into both towers,
captions paired with their images (several captions of one image are not each other's negatives),
the stage losses through the normal training loop, and the config refusals."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vitune.checkpoints.model_folder import load_pretrained
from vitune.config import ConfigError, ContrastiveConfig, apply_overrides
from vitune.data.chat import Message, caption_text
from vitune.data.dataset import BadRecords, encode_trainset, make_batch
from vitune.data.llava import Conversation
from vitune.data.processor import ImageTransform, encode_caption
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.files import DataError
from vitune.model.losses import info_nce
from vitune.model.vlm import VLM
from vitune.presets import tiny
from vitune.training.metrics_log import read_metrics
from vitune.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_info_nce(img, txt, scale):
    """Symmetric InfoNCE written out term by term."""
    B = len(img)
    s = [[scale * sum(a * b for a, b in zip(img[i], txt[j])) for j in range(B)] for i in range(B)]
    i2t = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(B))) for i in range(B)) / B
    t2i = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(B))) for j in range(B)) / B
    return 0.5 * (i2t + t2i)


def test_info_nce_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    got = info_nce(img, txt, torch.tensor(7.0))
    assert got.item() == pytest.approx(hand_info_nce(img.tolist(), txt.tolist(), 7.0), rel=1e-5)
    # perfectly matched pairs at a high scale: loss near 0; swapped texts: large
    assert info_nce(img, img, torch.tensor(100.0)).item() < 1e-3
    assert info_nce(img, img.flip(0), torch.tensor(100.0)).item() > 10


def test_pairs_of_one_image_are_not_each_others_negatives():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    img = torch.stack([img[0], img[0], img[1]])  # rows 0 and 1: two captions of one image
    got = info_nce(img, txt, torch.tensor(5.0), groups=torch.tensor([3, 3, 8]))
    s = 5.0 * img @ txt.T
    s[0, 1] = s[1, 0] = float("-inf")  # excluded both ways
    want = 0.5 * (F.cross_entropy(s, torch.arange(3)) + F.cross_entropy(s.T, torch.arange(3)))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert got.item() != pytest.approx(info_nce(img, txt, torch.tensor(5.0)).item())


def aligned_model(tok, dim=16) -> VLM:
    torch.manual_seed(0)
    cfg = tiny().model
    text = dataclasses.replace(ContrastiveConfig().text, vocab_size=tok.vocab_size, dim=32, heads=2, ffn_dim=64,
                               pad_id=tok.special.eos)
    cfg = dataclasses.replace(cfg, contrastive=ContrastiveConfig(dim=dim, text=text),
                              lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size))
    return VLM(cfg, tok.special.image)


def test_gradients_reach_both_towers_and_the_temperature(tok):
    model = aligned_model(tok)
    ids = torch.tensor([[tok.special.im_start] + tok.encode(t) for t in ("a red ball", "a blue cub")])
    loss = model.contrastive_loss(torch.randn(2, 3, 32, 32), (ids, torch.ones_like(ids, dtype=torch.bool)), None)
    loss.backward()
    head = model.contrastive
    for name, params in [("vision", model.vision.parameters()), ("text", head.text.parameters()),
                         ("image_proj", head.image_proj.parameters()), ("text_proj", head.text_proj.parameters())]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    assert head.log_scale.grad is not None and head.log_scale.grad != 0
    assert all(p.grad is None for p in model.lm.parameters())  # the LM takes no part


def test_temperature_starts_at_its_init_and_is_clamped(tok):
    head = aligned_model(tok).contrastive
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.log_scale.fill_(10.0)
    assert head.scale().item() == pytest.approx(1 / 0.01, rel=1e-5)


def test_embeddings_are_unit_vectors_of_the_head_dim(tok):
    model = aligned_model(tok, dim=12).eval()
    ids = torch.tensor([[tok.special.im_start] + tok.encode("a cat")])
    with torch.no_grad():
        v = model.embed_images(torch.randn(3, 3, 32, 32))
        z = model.embed_texts(ids, torch.ones_like(ids, dtype=torch.bool))
    assert v.shape == (3, 12) and z.shape == (1, 12)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3)) and torch.allclose(z.norm(dim=-1), torch.ones(1))


def test_model_without_a_head_says_so(tok):
    model = VLM(dataclasses.replace(tiny().model, lm=dataclasses.replace(tiny().model.lm, vocab_size=tok.vocab_size)),
                tok.special.image)
    with pytest.raises(ValueError, match="no alignment head"):
        model.embed_images(torch.randn(1, 3, 32, 32))


def test_caption_is_the_first_answer_and_is_cut_with_a_warning(tok):
    msgs = [Message("user", f"{IMAGE_SLOT}"), Message("assistant", "a red square"), Message("user", "more?"),
            Message("assistant", "no")]
    assert caption_text(msgs) == "a red square"
    warnings = []
    ids = encode_caption(tok, msgs, 5, "record 'r1'", warnings.append)
    assert ids == [tok.special.im_start] + tok.encode("a red square")[:4]
    assert warnings == ["record 'r1': caption of 13 tokens cut to the text encoder's max_len=5"]
    with pytest.raises(DataError, match="record 'r2': an alignment .* needs an image and an answer"):
        encode_caption(tok, [Message("user", "hi"), Message("assistant", "hello")], 64, "record 'r2'", print)


def test_batch_pairs_each_row_with_its_first_image_and_groups_by_image(tok, image_dir):
    def conv(i, image, caption):
        return Conversation(f"r{i}", (Message("user", f"{IMAGE_SLOT}"), Message("assistant", caption)),
                            (image_dir / image,))
    convs = [conv(0, "a.png", "first"), conv(1, "b.png", "second"), conv(2, "a.png", "again a")]
    ts = encode_trainset(convs, tok, "plain", ImageTransform(32, (0.5,) * 3, (0.5,) * 3, "pad"), 4, 64,
                         BadRecords("error", print), caption_len=16)
    b = make_batch(ts, [2, 1, 0], ImageTransform(32, (0.5,) * 3, (0.5,) * 3, "pad"), tok.special.eos)
    assert b.pairs.image.tolist() == [0, 1, 2]
    assert b.pairs.group.tolist() == [0, 1, 0]  # rows 2 and 0 show a.png
    assert torch.equal(b.pixel_values[0], b.pixel_values[2])
    assert b.pairs.ids[1, : b.pairs.mask[1].sum()].tolist() == [tok.special.im_start] + tok.encode("second")


def data(shapes_dir):
    return {"align": str(shapes_dir / "align.json"), "instruct": str(shapes_dir / "instruct.json")}


ALIGN = ["model.contrastive.dim=16", "model.contrastive.text.dim=32", "model.contrastive.text.heads=2",
         "model.contrastive.text.ffn_dim=64", "train.stages.1.steps=2"]


def test_dual_encoder_stage_trains_only_the_alignment_loss(shapes_dir, tmp_path):
    cfg = apply_overrides(tiny(), ALIGN + ["train.stages.0.steps=3", "train.stages.0.lm_weight=0",
                                           "train.stages.0.contrastive_weight=1", "train.stages.0.train=[vision,contrastive]"])
    out = train(cfg, data(shapes_dir), tmp_path, progress=False, log=lambda s: None).model
    rows = read_metrics(tmp_path / "metrics.jsonl")
    align = [r for r in rows if r["stage"] == "align"]
    assert len(align) == 3 and all(r["loss"] == r["contrastive_loss"] for r in align)
    assert all(r["contrastive_loss"] is None for r in rows if r["stage"] == "instruct")
    model = load_pretrained(out)[0]
    assert model.contrastive is not None and model.contrastive.image_proj.weight.shape == (16, 32)


def test_auxiliary_alignment_loss_adds_to_the_lm_loss(shapes_dir, tmp_path):
    cfg = apply_overrides(tiny(), ALIGN + ["train.stages.0.steps=2", "train.stages.0.contrastive_weight=0.5",
                                           "train.stages.0.train=[vision,connector,lm,contrastive]"])
    train(cfg, data(shapes_dir), tmp_path, progress=False, log=lambda s: None)
    align = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "align"]
    assert all(r["loss"] > 0.5 * r["contrastive_loss"] > 0 for r in align)


@pytest.mark.parametrize("overrides, match", [
    (["train.stages.0.contrastive_weight=1"], r"train\.stages\.0\.contrastive_weight > 0 needs an alignment head"),
    (["train.stages.0.train=[contrastive]"], r"train\.stages\.0\.train names 'contrastive' but"),
    (["model.contrastive.dim=8", "train.stages.0.lm_weight=0"], r"train\.stages\.0: lm_weight and contrastive_weight"),
    (["model.contrastive.dim=8", "train.stages.0.contrastive_weight=-1"], r"must be >= 0"),
    (["model.contrastive.dim=8", "model.contrastive.min_temperature=0.5"], r"min_temperature <= init_temperature"),
    (["model.contrastive.dim=8", "train.stages.1.contrastive_weight=1", "train.stages.1.packing=shared_prefix"],
     r"train\.stages\.1: contrastive_weight pairs each row with one caption"),
])
def test_bad_alignment_configs_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(tiny(), overrides)
