"""LLaVA records and training sets: `parse_record` validation beyond tests/test_llava_data.py,
over-long sequences, the image bank, instructions, `mix_in`, `make_batch` and `pack_trainset`."""

import pytest
from conftest import write_json

from vitune.conventions import IGNORE_INDEX
from vitune.data.chat import Message
from vitune.data.dataset import (
    BadRecords,
    conversation_texts,
    encode_trainset,
    load_conversations,
    make_batch,
    mix_in,
    pack_trainset,
)
from vitune.data.llava import Conversation, parse_record
from vitune.data.processor import ImageTransform
from vitune.data.tokenizer import IMAGE_SLOT
from vitune.files import DataError

TR = ImageTransform(16, (0.5,) * 3, (0.5,) * 3)
QA = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "noise"}]
TEXT = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]


def raise_all():
    return BadRecords("error", print)


def encode(convs, tok, max_len=256, bad=None, **kw):
    return encode_trainset(convs, tok, "chatml", TR, 4, max_len, bad or raise_all(), **kw)


def load(image_dir, records, bad=None):
    return load_conversations(write_json(image_dir / "d.json", records), None, bad or raise_all())


BAD = [
    ({"id": "both", "image": "a.png", "images": ["a.png"], "conversations": QA},
     "record 'both': has both 'image' and 'images'"),
    ({"id": "str", "images": "a.png", "conversations": QA},
     "record 'str': 'image'/'images' must be a path or a list of paths, got 'a.png'"),
    ({"id": "empty", "image": "", "conversations": QA}, "record 'empty': 'image'/'images' must be a path"),
    ({"id": "null", "image": None, "conversations": QA}, r"record 'null': .*got \[None\]"),
    ({"id": "dir", "image": ".", "conversations": QA}, "record 'dir': image not found"),
    ({"id": "conv", "conversations": "hello"}, "record 'conv': 'conversations' is missing or empty"),
    ({"id": "none"}, "record 'none': 'conversations' is missing or empty"),
    ({"id": "sys", "conversations": [{"from": "system", "value": "be brief"}]},
     "record 'sys': conversation has no user/assistant turns"),
    ({"id": "turn", "conversations": ["hello", "hi"]}, "record 'turn': turn 0 must be an object with a string 'value'"),
    ({"id": "num", "conversations": [TEXT[0], {"from": "gpt", "value": 3}]}, "record 'num': turn 1 must be an object"),
    ({"id": "nofrom", "conversations": [{"value": "x"}, TEXT[1]]}, "record 'nofrom': turn 0 has unknown role None"),
    ({"id": "sys2", "conversations": [TEXT[0], {"from": "system", "value": "s"}, TEXT[1]]},
     "record 'sys2': wrong role order: turn 1 is 'system', expected 'assistant'"),
    ({"id": "twice", "conversations": [TEXT[0], TEXT[0], TEXT[1]]},
     "record 'twice': wrong role order: turn 1 is 'user'"),
    ({"id": "tags", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, TEXT[1]]},
     "record 'tags': 2 <image> tag.*but 1 image"),
    ({"conversations": [TEXT[0]]}, "record '#1': the last turn is from the human"),  # no id: its index
]


@pytest.mark.parametrize("record,message", BAD, ids=[str(b[0].get("id", "no-id")) for b in BAD])
def test_bad_record_message_names_the_file_record_and_problem(image_dir, record, message):
    with pytest.raises(DataError, match=r"d\.json: " + message):
        load(image_dir, [{"id": "ok", "conversations": TEXT}, record])


def test_unhashable_role_is_a_data_error(image_dir):
    bad = BadRecords("skip", lambda s: None)
    rec = {"id": "r", "conversations": [{"from": ["human"], "value": "x"}, TEXT[1]]}
    assert load(image_dir, [rec, {"id": "ok", "conversations": TEXT}], bad)[0].id == "ok"
    assert bad.skipped == 1


def test_image_tag_in_an_assistant_turn_is_rejected(image_dir):
    rec = {"id": "g", "image": "a.png", "conversations": [
        {"from": "human", "value": "describe"}, {"from": "gpt", "value": "<image> a cat"}]}
    with pytest.raises(DataError, match="record 'g'"):
        load(image_dir, [rec])


def test_roles_ids_and_image_paths_are_normalised(image_dir):
    rec = {"id": 7, "images": ["b.png", "a.png"], "conversations": [
        {"from": "system", "value": "sys"}, {"from": "user", "value": "<image> vs <image>"},
        {"from": "assistant", "value": "same"}]}
    conv = parse_record(rec, 0, "src", image_dir)
    assert conv == Conversation("7", (Message("system", "sys"), Message("user", f"{IMAGE_SLOT} vs {IMAGE_SLOT}"),
                                      Message("assistant", "same")), (image_dir / "b.png", image_dir / "a.png"))
    assert parse_record({"images": [], "conversations": TEXT}, 4, "src", image_dir).id == "#4"


def test_conversation_texts_drop_image_tags(image_dir):
    convs = load(image_dir, [{"id": "a", "image": "a.png", "conversations": QA}])
    assert conversation_texts(convs) == [" \nWhat is this?", "noise"]


def test_skip_policy_logs_the_full_reason(image_dir):
    logs = []
    bad = BadRecords("skip", logs.append)
    records = [{"id": "x", "image": "nope.png", "conversations": QA}, {"id": "ok", "conversations": TEXT}]
    convs = load(image_dir, records, bad)
    assert [c.id for c in convs] == ["ok"] and bad.skipped == 1
    where = f"{image_dir / 'd.json'}: record 'x'"
    assert logs == [f"skipped bad record: {where}: image not found: {image_dir / 'nope.png'}"]


LONG = [  # (record, max_len, message); 4 tokens per image, chatml
    ({"id": "img", "image": "a.png", "conversations": QA}, 3,
     "record 'img': its 4 image tokens alone exceed max_seq_len=3"),
    ({"id": "pre", "image": "a.png", "conversations": [{"from": "human", "value": "x" * 40 + "<image>"}, QA[1]]}, 30,
     ("record 'pre': 70 tokens; cutting to max_seq_len=30 would cut into an image span "
      "\\(its last image token is at position 49\\)")),
    ({"id": "ans", "conversations": [{"from": "human", "value": "q" * 40}, {"from": "gpt", "value": "a"}]}, 30,
     "record 'ans': no trained \\(assistant\\) tokens remain after cutting to max_seq_len=30"),
]


@pytest.mark.parametrize("record,max_len,message", LONG, ids=[r[0]["id"] for r in LONG])
def test_over_long_records_are_rejected_with_their_id(image_dir, tok, record, max_len, message):
    with pytest.raises(DataError, match=message):
        encode(load(image_dir, [record]), tok, max_len)


def test_over_long_records_are_skipped_and_long_answers_cut(image_dir, tok):
    logs = []
    bad = BadRecords("skip", logs.append)
    long_answer = {"id": "cut", "conversations": [TEXT[0], {"from": "gpt", "value": "z" * 100}]}
    ts = encode(load(image_dir, [r for r, _, _ in LONG] + [long_answer]), tok, 30, bad)
    assert ts.ids == ["cut"] and bad.skipped == 3 and len(logs) == 4
    assert "record 'cut'" in logs[-1] and "tokens cut to max_seq_len=30" in logs[-1]  # said, never silent
    ids, labels = ts.rows[0]
    assert len(ids) == len(labels) == 30 and labels[-1] == ids[-1] == tok.encode("z")[0]


def test_no_usable_records_is_an_error(image_dir, tok):
    convs = load(image_dir, [r for r, _, _ in LONG])
    with pytest.raises(DataError, match="no usable records in the training data"):
        encode(convs, tok, 3, BadRecords("skip", lambda s: None))


def test_image_bank_holds_each_image_once(image_dir, tok):
    rows = [{"id": "1", "image": "a.png", "conversations": QA}, {"id": "2", "image": "b.png", "conversations": QA},
            {"id": "3", "conversations": TEXT}, {"id": "4", "image": "a.png", "conversations": QA}]
    ts = encode(load(image_dir, rows), tok)
    assert ts.images == [[0], [1], [], [0]] and tuple(ts.bank.shape) == (2, 3, 16, 16)
    assert ts.instructions is None and ts.segments is None and len(ts) == 4


def test_system_prompt_and_instructions(image_dir, tok):
    logs = []
    question = {"from": "human", "value": "<image>\nWhat  colour is it?"}
    rec = {"id": "i", "image": "a.png", "conversations": [question, QA[1]]}
    ts = encode(load(image_dir, [rec]), tok, bad=BadRecords("error", logs.append), system_prompt="Be brief.",
                instruction_len=8)
    assert tok.decode(ts.rows[0][0], skip_special=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert ts.instructions == [[[tok.special.im_start] + tok.encode("What co")]]
    assert logs == ["record 'i': instruction of 19 tokens cut to the instruction encoder's max_len=8"]
    with pytest.raises(ValueError, match="shared-prefix packing shares image tokens"):
        pack_trainset(ts, 256, tok.special.image)


def test_make_batch_gathers_rows_and_their_images_in_order(image_dir, tok):
    rows = [{"id": "1", "image": "a.png", "conversations": QA}, {"id": "2", "conversations": TEXT},
            {"id": "3", "images": ["b.png", "a.png"],
             "conversations": [{"from": "human", "value": "<image><image>"}, QA[1]]}]
    ts = encode(load(image_dir, rows), tok)
    b = make_batch(ts, [2, 1], TR, pad_id=tok.special.eos)
    assert b.pixel_values.shape == (2, 3, 16, 16)
    assert b.pixel_values.eq(TR.normalize(ts.bank[[1, 0]])).all()
    assert b.input_ids[0].tolist() == ts.rows[2][0]
    assert b.input_ids[1, len(ts.rows[1][0]):].eq(tok.special.eos).all()
    assert b.labels[0].tolist() == ts.rows[2][1] and b.labels[1, len(ts.rows[1][1]):].eq(IGNORE_INDEX).all()
    assert b.n_targets == len("noise") + 1 + len("hi") + 1  # each answer and its <|im_end|>


@pytest.mark.parametrize("n_main,n_extra,fraction,want", [
    (4, 2, 0.0, list("abcd") + list("xy")),         # 0: each extra once
    (4, 2, 0.5, list("abcd") + list("xyxy")),       # cycled to half the result
    (3, 2, 0.25, list("abc") + ["x"]),              # round(1/3 * 3) = 1
    (2, 3, 0.75, list("ab") + list("xyzxyz")),      # round(3 * 2) = 6
    (4, 2, 0.4, list("abcd") + list("xyx")),        # round(2/3 * 4) = 3, not 2
    (3, 0, 0.5, list("abc")),                       # nothing to mix
])
def test_mix_in(n_main, n_extra, fraction, want):
    assert mix_in(list("abcd")[:n_main], list("xyz")[:n_extra], fraction) == want


@pytest.mark.parametrize("records, message", [
    ([], "holds no records"),
    ([{"id": "d", "conversations": TEXT}, {"id": "d", "conversations": TEXT}], "record 'd': duplicate id"),
    ([{"id": ["x"], "conversations": TEXT}], r"record #0: 'id' must be a string or an integer"),
])
def test_empty_files_duplicate_and_malformed_ids_name_the_file_and_record(image_dir, records, message):
    with pytest.raises(DataError, match=message):
        load(image_dir, records)
