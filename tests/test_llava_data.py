"""LLaVA records: every bad-record case fails with the record id, or is skipped and counted."""

import pytest
from conftest import write_json

from vitune.data.dataset import BadRecords, encode_trainset, load_conversations
from vitune.data.processor import ImageTransform
from vitune.files import DataError

GOOD = {"id": "ok", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "noise"}]}


def conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


BAD = [
    ({"id": "r1", "image": "missing.png", "conversations": GOOD["conversations"]}, "record 'r1'.*image not found"),
    ({"id": "r2", "image": "a.png", "conversations": conv(("human", "no tag"), ("gpt", "x"))}, "record 'r2'.*0 <image> tag.*1 image"),
    ({"id": "r3", "images": ["a.png", "b.png"], "conversations": GOOD["conversations"]}, "record 'r3'.*1 <image> tag.*2 image"),
    ({"id": "r4", "conversations": []}, "record 'r4'.*empty"),
    ({"id": "r5", "conversations": conv(("gpt", "x"), ("human", "y"))}, "record 'r5'.*wrong role order"),
    ({"id": "r6", "conversations": conv(("human", "x"), ("robot", "y"))}, "record 'r6'.*unknown role 'robot'"),
    ({"id": "r7", "conversations": conv(("human", "x"), ("gpt", "y"), ("human", "z"))}, "record 'r7'.*last turn"),
    ({"id": "r8", "conversations": [{"from": "human"}]}, "record 'r8'.*string 'value'"),
    ({"id": "r9", "image": 3, "conversations": GOOD["conversations"]}, "record 'r9'.*path"),
]


@pytest.mark.parametrize("record,message", BAD, ids=[b[0]["id"] for b in BAD])
def test_bad_record_raises_with_its_id(image_dir, record, message):
    path = write_json(image_dir / "data.json", [GOOD, record])
    with pytest.raises(DataError, match=message):
        load_conversations(path, None, BadRecords("error", print))


def test_corrupt_image_is_named_when_decoded(image_dir, tok):
    rec = {"id": "bad-img", "image": "corrupt.png", "conversations": GOOD["conversations"]}
    convs = load_conversations(write_json(image_dir / "d.json", [rec]), None, BadRecords("error", print))
    with pytest.raises(DataError, match="record 'bad-img'.*corrupt"):
        encode_trainset(convs, tok, "chatml", ImageTransform(16, (0.5,) * 3, (0.5,) * 3), 4, 256, BadRecords("error", print))


def test_malformed_json_names_the_line(image_dir):
    path = image_dir / "d.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n{"id": oops}\n')
    with pytest.raises(DataError, match="d.jsonl: line 2: malformed JSON"):
        load_conversations(path, None, BadRecords("error", print))


def test_skip_policy_logs_each_and_counts(image_dir, tok):
    logs = []
    bad = BadRecords("skip", logs.append)
    records = [GOOD] + [b[0] for b in BAD] + [{"id": "c", "image": "corrupt.png", "conversations": GOOD["conversations"]}]
    convs = load_conversations(write_json(image_dir / "d.json", records), None, bad)
    ts = encode_trainset(convs, tok, "chatml", ImageTransform(16, (0.5,) * 3, (0.5,) * 3), 4, 256, bad)
    assert ts.ids == ["ok"]
    assert bad.skipped == len(BAD) + 1 == len(logs)
    assert all("skipped bad record" in line for line in logs)


def test_text_only_multi_image_and_jsonl(image_dir, tok):
    rows = [
        {"id": "t", "conversations": conv(("human", "hello"), ("gpt", "hi"))},
        {"id": "m", "images": ["a.png", "b.png"], "conversations": conv(("human", "<image> vs <image>"), ("gpt", "same"), ("human", "sure?"), ("gpt", "yes"))},
    ]
    path = image_dir / "d.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    convs = load_conversations(path, None, BadRecords("error", print))
    ts = encode_trainset(convs, tok, "chatml", ImageTransform(16, (0.5,) * 3, (0.5,) * 3), 4, 256, BadRecords("error", print))
    assert ts.images == [[], [0, 1]] and ts.bank.shape == (2, 3, 16, 16)
    assert ts.rows[1][0].count(tok.special.image) == 8


def test_image_root_overrides_the_data_folder(image_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = write_json(other / "d.json", [GOOD])
    with pytest.raises(DataError, match="image not found"):
        load_conversations(path, None, BadRecords("error", print))
    assert len(load_conversations(path, image_dir, BadRecords("error", print))) == 1
