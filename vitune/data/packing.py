"""Shared-prefix packing: many single-turn questions about one image trained in one row.

VQA sets ask several questions about each image (easy-VQA: ~10). Trained as separate rows, every
question pays again for the system prompt and the image tokens, which are most of each row. Packed,
a row holds the shared prefix once, then each question's own suffix:

    [system + <image x N> + "user\\n"] [question 1 + answer 1] [question 2 + answer 2] ...
     segment 0 (positions 0..P-1)      segment 1 (P..)         segment 2 (P..)

`segments` gives every token its segment; the model turns it into an attention mask
(`vitune.model.attention.attention_layout`) (a suffix
token sees the prefix and earlier tokens of its own suffix, never another suffix) and positions
(each suffix restarts at P). Each question's loss is therefore exactly what it is as a row of its
own, which the tests check; nothing is read across questions, so answers cannot leak between them.

Rows group by their images (the same bank indices). The shared prefix is the group's longest
common token prefix, cut to end before the first trained token of any member (the first suffix
token is then an input, so shifted labels stay inside their suffix), and it must hold every image
token; a group that fails this stays unpacked. Text-only rows are never packed.
"""

from __future__ import annotations

from itertools import groupby

from vitune.conventions import IGNORE_INDEX, PREFIX_SEGMENT

Row = tuple[list[int], list[int]]  # (input_ids, labels)


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest start all `seqs` share."""
    p = min(len(s) for s in seqs)
    for s in seqs[1:]:
        p = next((i for i in range(p) if s[i] != seqs[0][i]), p)
    return p


def shared_prefix_len(rows: list[Row], image_id: int) -> int:
    """Tokens the rows can share (0: they cannot be packed)."""
    p = common_prefix_len([ids for ids, _ in rows])
    for _, labels in rows:
        first_target = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
        p = min(p, first_target - 1)
    if p <= 0 or any(image_id in ids[p:] for ids, _ in rows):
        return 0
    return p


def pack_group(rows: list[Row], max_len: int, image_id: int
               ) -> list[tuple[list[int], list[int], list[int]]] | None:
    """Pack rows that share their images into `(ids, labels, segments)` rows of at most `max_len`
    tokens, or None when they share no usable prefix."""
    p = shared_prefix_len(rows, image_id) if len(rows) > 1 else 0
    if p == 0:
        return None
    prefix_ids, prefix_labels = rows[0][0][:p], rows[0][1][:p]
    packed: list[tuple[list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int]] | None = None
    for ids, labels in rows:
        suffix_ids, suffix_labels = ids[p:], labels[p:]
        if cur is None or len(cur[0]) + len(suffix_ids) > max_len:
            cur = (list(prefix_ids), list(prefix_labels), [PREFIX_SEGMENT] * p)
            packed.append(cur)
        seg = cur[2][-1] + 1  # the last segment so far is the highest
        cur[0].extend(suffix_ids)
        cur[1].extend(suffix_labels)
        cur[2].extend([seg] * len(suffix_ids))
    return packed


def _group_key(images: list[int], r: int) -> tuple[int, ...]:
    return tuple(images) if images else (-1, r)  # a text-only row is a group of its own


def pack_shared_prefix(rows: list[Row], images: list[list[int]], ids: list[str], max_len: int, image_id: int
                       ) -> tuple[list[Row], list[list[int]], list[str], list[list[int] | None]]:
    """Pack a training set's rows; returns (rows, images, ids, segments), segments None for a row
    left as it was. A packed row's id is its members' ids joined by '+'."""
    order = sorted(range(len(rows)), key=lambda r: (_group_key(images[r], r), r))
    out: tuple[list, list, list, list] = ([], [], [], [])
    for _, group in groupby(order, key=lambda r: _group_key(images[r], r)):
        members = list(group)
        packed = pack_group([rows[r] for r in members], max_len, image_id) if images[members[0]] else None
        if packed is None:
            for r in members:
                _append(out, rows[r], images[r], ids[r], None)
            continue
        done = 0
        for p_ids, p_labels, p_segs in packed:
            n = max(p_segs)
            _append(out, (p_ids, p_labels), list(images[members[0]]), "+".join(ids[r] for r in members[done:done + n]), p_segs)
            done += n
    return out


def _append(out: tuple[list, list, list, list], row: Row, images: list[int], rid: str, segments: list[int] | None) -> None:
    for column, value in zip(out, (row, images, rid, segments)):
        column.append(value)
