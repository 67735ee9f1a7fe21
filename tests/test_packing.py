"""Shared-prefix packing: what is shared, how rows split, and that a packed row trains exactly
like its questions as separate rows (same loss, same gradients)."""

import dataclasses

import pytest
import torch

from vitune.data.chat import IGNORE_INDEX, Message
from vitune.data.packing import pack_shared_prefix, shared_prefix_len
from vitune.data.processor import ImageTransform, collate, encode_conversation
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.model.attention import attention_layout
from vitune.model.vlm import VLM
from vitune.presets import tiny

I = IGNORE_INDEX
IMG = 99


def test_prefix_stops_before_the_first_trained_token():
    a = ([1, IMG, IMG, 5, 6, 7, 8], [I, I, I, I, I, 7, 8])
    b = ([1, IMG, IMG, 5, 6, 7, 9], [I, I, I, I, I, I, 9])
    # common prefix is 6 tokens, but a's first target is at 5: the prefix ends before position 4
    assert shared_prefix_len([a, b], IMG) == 4


def test_no_packing_when_an_image_token_is_outside_the_prefix():
    a = ([1, 2, IMG, 5, 6], [I, I, I, I, 6])
    b = ([1, 3, IMG, 5, 7], [I, I, I, I, 7])
    assert shared_prefix_len([a, b], IMG) == 0


def test_packs_by_image_and_splits_at_max_len():
    def q(x):  # prefix [1, IMG, 2], then question x and its answer
        return ([1, IMG, 2, x, x + 1, 50], [I, I, I, I, x + 1, 50])

    rows = [q(10), q(20), ([7, 8], [I, 8]), q(30), q(40)]
    images = [[0], [0], [], [1], [0]]
    ids = ["a", "b", "text", "c", "d"]
    out_rows, out_images, out_ids, segs = pack_shared_prefix(rows, images, ids, max_len=9, image_id=IMG)
    by_id = dict(zip(out_ids, zip(out_rows, out_images, segs)))
    assert sorted(by_id) == ["a+b", "c", "d", "text"]
    (ids_ab, labels_ab), img_ab, seg_ab = by_id["a+b"]
    assert ids_ab == [1, IMG, 2, 10, 11, 50, 20, 21, 50] and img_ab == [0]
    assert labels_ab == [I, I, I, I, 11, 50, I, 21, 50]
    assert seg_ab == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # "d" shares a's image but no longer fits: a new row with the prefix again
    assert by_id["d"][0][0] == [1, IMG, 2, 40, 41, 50] and by_id["d"][2] == [0, 0, 0, 1, 1, 1]
    # a lone row ("c") and a text-only row are left as they were
    assert by_id["c"][0] == q(30) and by_id["c"][2] is None and by_id["text"][2] is None
    # every trained token survives
    kept = sorted(t for (_, lab), _, _ in by_id.values() for t in lab if t != I)
    assert kept == sorted(t for _, lab in rows for t in lab if t != I)


def test_attention_layout():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    positions, mask = attention_layout(seg)
    assert positions.tolist() == [[0, 1, 2, 3, 2, 3, 2]]
    m = mask[0, 0].int().tolist()
    assert m[3] == [1, 1, 1, 1, 0, 0, 0]  # segment 1 sees the prefix and itself
    assert m[5] == [1, 1, 0, 0, 1, 1, 0]  # segment 2 does not see segment 1
    assert m[6] == [1, 1, 0, 0, 0, 0, 1]  # padding sees the prefix and itself only
    unpacked_pos, unpacked_mask = attention_layout(torch.zeros(1, 4, dtype=torch.long))
    assert unpacked_pos.tolist() == [[0, 1, 2, 3]] and torch.equal(unpacked_mask[0, 0], torch.ones(4, 4).tril().bool())


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size, max_seq_len=400))
    return VLM(cfg, tok.special.image)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, _ = model(batch.input_ids, batch.labels, batch.pixel_values, segments=batch.segments)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_rows_train_exactly_like_separate_rows(model, tok, one_thread):
    qa = [("what colour is it?", "red"), ("is there a circle?", "no"), ("what shape?", "a square"),
          ("count them", "3")]
    rows = [encode_conversation(tok, [Message("user", f"{IMAGE_SLOT}\n{q}"), Message("assistant", a)], "chatml",
                                model.n_image_tokens, 400, f"r{i}", system_prompt="Be brief.")
            for i, (q, a) in enumerate(qa)]
    rows.append(encode_conversation(tok, [Message("user", "hello"), Message("assistant", "hi")], "chatml",
                                    model.n_image_tokens, 400, "text", system_prompt="Be brief."))
    images = [[0]] * 4 + [[]]
    tf = ImageTransform(32, (0.5,) * 3, (0.5,) * 3)
    bank = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    p_rows, p_images, _, p_segs = pack_shared_prefix(rows, images, [str(i) for i in range(5)], 400, tok.special.image)
    assert len(p_rows) == 2 and sum(s is not None for s in p_segs) == 1
    plain = collate(rows, bank[[0] * 4], tf, tok.special.eos)
    packed = collate(p_rows, bank[[i for im in p_images for i in im]], tf, tok.special.eos, p_segs)
    assert packed.n_targets == plain.n_targets and packed.input_ids.numel() < plain.input_ids.numel()
    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4), n
