"""`vitune data inspect` (inspect_data.py): the header's exact counts, the masked rendering per
template, index and record errors, and a model folder's tokenizer, image tokens and system prompt."""

import dataclasses

import pytest
import torch
from conftest import write_json

from vitune.checkpoints.model_folder import save_pretrained
from vitune.config import ConnectorConfig
from vitune.data.tokenizer import byte_level
from vitune.files import DataError
from vitune.inspect_data import inspect_record
from vitune.model.vlm import VLM
from vitune.presets import tiny

RULE = "-" * 60
RECORDS = [
    {"id": "r0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]},
    {"id": "r1", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
        {"from": "human", "value": "again"}, {"from": "gpt", "value": "ok"}]},
]


@pytest.fixture
def data(image_dir):
    return str(write_json(image_dir / "d.json", RECORDS))


def inspect(path, index, template="chatml", model=None, color=False):
    return inspect_record(path, index, template, model, "tiny", None, color=color)


def test_chatml_record_with_an_image(data):
    # 47 = <|im_start|>user\n (6) + 16 image tokens + "\nColor?" (7) + <|im_end|>\n (2)
    #      + <|im_start|>assistant\n (11) + "red" (3) + <|im_end|>\n (2); trained: "red" + <|im_end|>
    head, rule, *body, end = inspect(data, 0).split("\n")
    assert head == ("record 'r0' (0 of 2), template 'chatml': 47 tokens, 4 trained, 1 image(s) x 16 tokens; "
                    "trained tokens in [[...]]")
    assert rule == end == RULE
    assert body == ["<|im_start|>user", "<image x16>", "Color?<|im_end|>", "<|im_start|>assistant",
                    "[[red<|im_end|>]]", ""]


def test_plain_template_trains_each_answer_and_its_eos(data):
    head, _, body, _ = inspect(data, 1, "plain").split("\n")
    assert head.startswith("record 'r1' (1 of 2), template 'plain': 13 tokens, 6 trained, 0 image(s) x 16 tokens")
    assert body == "hi[[yo<|endoftext|>]]again[[ok<|endoftext|>]]"


def test_colour_marks_trained_tokens_bold_green(data):
    shown = inspect(data, 1, color=True)
    assert shown.split("\n")[0].endswith("; trained tokens in bold green, masked dim")
    assert "\033[1;32myo<|im_end|>\033[0m" in shown and "\033[1;32mok<|im_end|>\033[0m" in shown
    assert "[[" not in shown and shown.count("\033[1;32m") == 2


@pytest.mark.parametrize("index", [2, -1, 100])
def test_index_out_of_range_names_the_file_and_the_range(data, index):
    with pytest.raises(DataError, match=rf"d\.json: --index {index} is out of range \(0\.\.1\)"):
        inspect(data, index)


def test_a_bad_record_anywhere_in_the_file_stops_inspection(image_dir):
    path = write_json(image_dir / "d.json", RECORDS + [{"id": "bad", "image": "missing.png",
                                                        "conversations": RECORDS[0]["conversations"]}])
    with pytest.raises(DataError, match="record 'bad': image not found"):
        inspect(str(path), 0)


def test_a_record_too_long_for_the_preset_is_named(image_dir):
    long = {"id": "long", "conversations": [{"from": "human", "value": "q" * 300}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(DataError, match="record 'long': no trained .* max_seq_len=192"):
        inspect(str(write_json(image_dir / "d.json", [long])), 0)


def test_a_model_folder_brings_its_tokenizer_image_tokens_and_system_prompt(data, tmp_path):
    tok = byte_level()
    cfg = tiny().model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tok.vocab_size, max_seq_len=64),
                              connector=ConnectorConfig(reduce="pool2x2"), system_prompt="Be brief.")
    torch.manual_seed(0)
    save_pretrained(VLM(cfg, tok.special.image), tok, tmp_path / "m")
    head, _, *body, _ = inspect(data, 0, model=str(tmp_path / "m")).split("\n")
    # 54 = 47 - 12 image tokens + 19 of the system turn
    assert head.startswith("record 'r0' (0 of 2), template 'chatml': 54 tokens, 4 trained, 1 image(s) x 4 tokens")
    assert body[:3] == ["<|im_start|>system", "Be brief.<|im_end|>", "<|im_start|>user"] and "<image x4>" in body
