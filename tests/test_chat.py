"""Chat rendering: labels fall on assistant turns (and their end token) only, per template."""

import pytest

from vitune.data.chat import IGNORE_INDEX, Message, format_masked, render, stop_token_id
from vitune.data.tokenizer import IMAGE_SLOT


def trained_text(tok, r) -> str:
    return tok.decode([i for i, lab in zip(r.input_ids, r.labels) if lab != IGNORE_INDEX], skip_special=False)


def test_chatml_trains_only_assistant_turns(tok):
    msgs = [Message("user", f"{IMAGE_SLOT}\nWhat is it?"), Message("assistant", "a cat"),
            Message("user", "Color?"), Message("assistant", "black")]
    r = render(tok, msgs, "chatml", n_image_tokens=3)
    assert len(r.input_ids) == len(r.labels)
    assert trained_text(tok, r) == "a cat<|im_end|>black<|im_end|>"
    assert r.input_ids.count(tok.special.image) == 3
    # the rendered text is exactly ChatML
    full = tok.decode(r.input_ids, skip_special=False).replace("<image>" * 3, "<image>")
    assert full == ("<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\na cat<|im_end|>\n"
                    "<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\nblack<|im_end|>\n")


def test_chatml_system_prompt_is_masked(tok):
    r = render(tok, [Message("user", "hi"), Message("assistant", "yo")], "chatml", 1, system_prompt="Be brief.")
    assert tok.decode(r.input_ids, skip_special=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert trained_text(tok, r) == "yo<|im_end|>"


def test_plain_trains_caption_and_eos(tok):
    r = render(tok, [Message("user", f"{IMAGE_SLOT}"), Message("assistant", "two red squares")], "plain", 4)
    assert r.input_ids[:4] == [tok.special.image] * 4
    assert trained_text(tok, r) == "two red squares<|endoftext|>"
    assert all(lab == IGNORE_INDEX for lab in r.labels[:4])


def test_generation_prompt_and_stop_tokens(tok):
    r = render(tok, [Message("user", "q")], "chatml", 1, add_generation_prompt=True)
    assert tok.decode(r.input_ids, skip_special=False).endswith("<|im_start|>assistant\n")
    assert all(lab == IGNORE_INDEX for lab in r.labels)
    assert stop_token_id(tok, "chatml") == tok.special.im_end
    assert stop_token_id(tok, "plain") == tok.special.eos


def test_unknown_template_lists_valid(tok):
    with pytest.raises(ValueError, match="chatml"):
        render(tok, [Message("user", "q")], "llama2", 1)


def test_format_masked_marks_trained_tokens(tok):
    r = render(tok, [Message("user", f"{IMAGE_SLOT}\nq"), Message("assistant", "ans")], "chatml", 5)
    shown = format_masked(tok, r.input_ids, r.labels, color=False)
    assert "[[ans<|im_end|>]]" in shown and "<image x5>" in shown
    assert shown.count("[[") == 1
