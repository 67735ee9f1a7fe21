"""Processor: text-only truncation that never cuts an image span; image loading errors."""

import pytest
import torch

from vitune.data.chat import IGNORE_INDEX
from vitune.data.processor import ImageTransform, collate, fit_to_length, load_image
from vitune.files import DataError

IMG = 99


def test_short_sequences_are_untouched():
    ids, labels = [1, IMG, IMG, 2, 3], [IGNORE_INDEX] * 3 + [2, 3]
    assert fit_to_length(ids, labels, 10, IMG, "r") == (ids, labels)


def test_truncation_cuts_text_after_the_images_only():
    ids = [1] + [IMG] * 4 + list(range(10, 30))
    labels = [IGNORE_INDEX] * 5 + list(range(10, 30))
    out_ids, out_labels = fit_to_length(ids, labels, 12, IMG, "r")
    assert len(out_ids) == 12 and out_ids.count(IMG) == 4
    assert out_ids == ids[:12] and out_labels == labels[:12]


def test_cut_inside_an_image_span_is_rejected_with_the_record():
    ids = list(range(10, 20)) + [IMG] * 4 + [5, 6]
    with pytest.raises(DataError, match="record 'x'.*image span"):
        fit_to_length(ids, ids, 12, IMG, "record 'x'")


def test_image_tokens_alone_too_long_is_rejected():
    ids = [IMG] * 20 + [1, 2]
    with pytest.raises(DataError, match="image tokens alone exceed max_seq_len=16"):
        fit_to_length(ids, ids, 16, IMG, "r")


def test_truncation_that_removes_every_target_is_rejected():
    ids = [IMG] * 2 + list(range(10, 30))
    labels = [IGNORE_INDEX] * 20 + [28, 29]
    with pytest.raises(DataError, match="no trained"):
        fit_to_length(ids, labels, 10, IMG, "r")


def test_image_errors_name_the_file(image_dir):
    with pytest.raises(DataError, match="not found"):
        load_image(image_dir / "missing.png", "record 'r1'")
    with pytest.raises(DataError, match="record 'r2'.*corrupt"):
        load_image(image_dir / "corrupt.png", "record 'r2'")


def test_transform_pads_to_square_and_normalises(image_dir):
    tr = ImageTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")
    px = tr([load_image(image_dir / "a.png")])
    assert px.shape == (1, 3, 16, 16)
    assert px.min() >= -1.0 and px.max() <= 1.0
    u8 = ImageTransform(40, (0.5,) * 3, (0.5,) * 3).to_uint8(load_image(image_dir / "a.png"))
    # 30 wide, 40 high: padded by 5 columns of the mean colour on each side, no resize needed
    assert u8.dtype == torch.uint8 and u8.shape == (3, 40, 40)
    assert (u8[:, :, :5] == 127).all() and (u8[:, :, -5:] == 127).all() and not (u8[:, :, 5] == 127).all()


def test_collate_pads_right_and_counts_targets():
    rows = [([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [IGNORE_INDEX, 5])]
    b = collate(rows, torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ImageTransform(8, (0.5,) * 3, (0.5,) * 3), pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b.labels[1, 2].item() == IGNORE_INDEX
    assert b.n_targets == 3
