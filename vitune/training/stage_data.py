"""The training data of a run's stages, read once before training: each stage's conversations
(its file plus any `mix_data`), the bad-record policy, the files' fingerprints (`prepare_data`),
and image statistics measured from those images where the vision config asks (`with_image_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from vitune.config import Config, ConfigError
from vitune.data.dataset import BadRecords, load_conversations, mix_in
from vitune.data.processor import measure_stats
from vitune.training.run_folder import data_fingerprints

Log = Callable[[str], None]


@dataclass
class Prepared:
    convs: list[list]
    bad: BadRecords
    files: dict[str, str]           # stage name -> its data file
    fingerprints: dict[str, str]


def prepare_data(cfg: Config, data: dict[str, str], image_root: str | None, log: Log,
                 allow_outside: bool = False) -> Prepared:
    bad = BadRecords(cfg.train.on_bad_record, log)
    convs, files = [], {}
    for s in cfg.train.stages:
        path = data.get(s.name) or s.data
        if not path:
            raise ConfigError(f"stage {s.name!r} has no data: pass --data {s.name}=FILE or set train.stages.N.data")
        files[s.name] = path
        extra = [c for p in s.mix_data for c in load_conversations(p, None, bad, allow_outside_root=allow_outside)]
        convs.append(mix_in(load_conversations(path, image_root, bad, allow_outside_root=allow_outside), extra,
                            s.mix_fraction))
    return Prepared(convs, bad, files, data_fingerprints(cfg, files))


def with_image_stats(cfg: Config, prep: Prepared, log: Log) -> Config:
    """Fill image_mean/std from the training images when the vision config asks for it."""
    v = cfg.model.vision
    if not v.stats_from_data:
        return cfg
    paths = [p for convs in prep.convs for c in convs for p in c.images]
    mean, std = measure_stats(paths, v.image_size)
    log(f"image statistics from the training data: mean {mean}, std {std}")
    return replace(cfg, model=replace(cfg.model, vision=replace(v, image_mean=mean, image_std=std)))
