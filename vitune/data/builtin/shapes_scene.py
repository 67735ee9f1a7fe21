"""The shapes world: scenes of coloured shapes on a 3x3 grid, their rendering and captions,
and questions about them as data (`QuestionSpec`) with answers derived from the scene.

Everything here is a pure function of a scene and a numpy Generator; `vitune.data.builtin.shapes` turns
it into files. `scene_answer(scene, spec)` is the single source of truth for every answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Category = Literal["color", "shape", "size", "position", "existence", "count", "spatial",
                   "closest", "furthest", "same"]
Relation = Literal["left of", "right of", "above", "below"]
CountBy = Literal["color", "shape", "all"]
Attribute = Literal["color", "shape"]

CATEGORIES: tuple[Category, ...] = ("color", "shape", "size", "position", "existence", "count", "spatial")
# The relational family: about an object found by its relation to a named one. Distances are
# between grid cells (row, column), squared Euclidean; a question is asked only where its answer
# is unique (no tie for the closest or the furthest).
RELATIONAL: tuple[Category, ...] = ("closest", "furthest", "same")
ATTRIBUTES: tuple[Attribute, ...] = ("color", "shape")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 230),
    "yellow": (240, 210, 0), "purple": (140, 30, 190), "orange": (255, 140, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.25, "large": 0.55}  # object width as a fraction of a cell
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")
MAX_JITTER = 3  # px, each axis
NOISE = 8  # per-pixel uniform noise amplitude


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    cell: int  # 0..8, raster order (row * 3 + col)
    cx: float  # centre, pixels
    cy: float

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # sorted by cell
    image_size: int

    def find(self, color: str | None, shape: str | None) -> SceneObject | None:
        return next((o for o in self.objects if o.color == color and o.shape == shape), None)


@dataclass(frozen=True)
class QuestionSpec:
    """One question, as data; `question_text` renders it and `scene_answer` answers it."""

    category: Category
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    count_by: CountBy | None = None
    relation: Relation | None = None
    color2: str | None = None
    shape2: str | None = None
    ask: Attribute | None = None  # closest / furthest: which attribute of the found object


# ---------------------------------------------------------------- scenes and rendering

def make_scene(rng: np.random.Generator, image_size: int = 96) -> Scene:
    """2-4 objects in distinct cells, each (colour, shape) pair unique in the scene."""
    n = int(rng.integers(2, 5))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    pairs = rng.choice(len(COLOR_NAMES) * len(SHAPES), size=n, replace=False)
    cell_px = image_size / 3
    objects = []
    for cell, pair in zip(cells, pairs, strict=True):
        dx, dy = rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2)
        objects.append(SceneObject(
            color=COLOR_NAMES[int(pair) // len(SHAPES)], shape=SHAPES[int(pair) % len(SHAPES)],
            size="small" if rng.random() < 0.5 else "large", cell=cell,
            cx=(cell % 3 + 0.5) * cell_px + int(dx), cy=(cell // 3 + 0.5) * cell_px + int(dy)))
    return Scene(tuple(objects), image_size)


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw the objects on white, then add uniform per-pixel noise in [-NOISE, NOISE]."""
    s = scene.image_size
    img = Image.new("RGB", (s, s), "white")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        h = SIZES[o.size] * s / 3 / 2  # half width
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((o.cx - h, o.cy - h, o.cx + h, o.cy + h), fill=fill)
        elif o.shape == "square":
            draw.rectangle((o.cx - h, o.cy - h, o.cx + h, o.cy + h), fill=fill)
        else:
            draw.polygon([(o.cx, o.cy - h), (o.cx - h, o.cy + h), (o.cx + h, o.cy + h)], fill=fill)
    noise = rng.integers(-NOISE, NOISE + 1, size=(s, s, 3), dtype=np.int16)
    pixels = np.asarray(img, dtype=np.int16) + noise  # (H, W, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def caption(scene: Scene) -> str:
    """A grounded caption naming every cell of the 3x3 layout in reading order, e.g.
    "top left: empty; top: small red circle; ...". Every word after a cell's name can only be
    written by looking at that cell, which is what teaches a from-scratch tower to see."""
    by_cell = {o.cell: o for o in scene.objects}
    parts = [f"{name}: " + (f"{by_cell[c].size} {by_cell[c].color} {by_cell[c].shape}" if c in by_cell else "empty")
             for c, name in enumerate(POSITIONS)]
    return "; ".join(parts) + "."


def object_caption(scene: Scene) -> str:
    """The same scene in a second phrasing, for multi-caption retrieval (`vitune eval --bench
    shapes-retrieval`): its objects only, as a sentence, e.g. "A small red circle at the top and a
    large blue square at the bottom right." (never used in training)."""
    parts = [f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects]  # sizes: small, large
    if not parts:
        return "Nothing."
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------- questions and answers

def question_text(spec: QuestionSpec) -> str:
    c, s = spec.color, spec.shape
    match spec.category:
        case "color":
            return f"What color is the {s} at the {spec.position}?"
        case "shape":
            return f"What shape is the {c} object at the {spec.position}?"
        case "size":
            return f"What size is the {c} {s}?"
        case "position":
            return f"Where is the {c} {s}?"
        case "existence":
            return f"Is there {'an' if c[0] in 'aeiou' else 'a'} {c} {s}?"
        case "count":
            return {"color": f"How many {c} objects are there?", "shape": f"How many {s}s are there?",
                    "all": "How many objects are there?"}[spec.count_by]
        case "spatial":
            return f"Is the {c} {s} {spec.relation} the {spec.color2} {spec.shape2}?"
        case "closest":
            return f"What {spec.ask} is the object closest to the {c} {s}?"
        case "furthest":
            return f"What {spec.ask} is the object furthest from the {c} {s}?"
        case "same":
            return f"How many other objects have the same {spec.count_by} as the {c} {s}?"
    raise ValueError(f"unknown question category {spec.category!r}")


def relation_holds(a: SceneObject, b: SceneObject, relation: Relation) -> bool:
    """Grid relations: strictly smaller column is 'left of', strictly smaller row is 'above'."""
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def cell_distance(a: SceneObject, b: SceneObject) -> int:
    """Squared Euclidean distance between two objects' grid cells."""
    return (a.row - b.row) ** 2 + (a.col - b.col) ** 2


def extreme_object(scene: Scene, anchor: SceneObject, which: Literal["closest", "furthest"]) -> SceneObject | None:
    """The other object closest to / furthest from `anchor`, or None where two tie (or none is there)."""
    others = sorted((cell_distance(anchor, o), i) for i, o in enumerate(scene.objects) if o is not anchor)
    if which == "furthest":
        others.reverse()
    if not others or (len(others) > 1 and others[0][0] == others[1][0]):
        return None
    return scene.objects[others[0][1]]


def _require(obj: SceneObject | None, spec: QuestionSpec) -> SceneObject:
    if obj is None:
        raise ValueError(f"question refers to an object not in the scene: {spec}")
    return obj


def scene_answer(scene: Scene, spec: QuestionSpec) -> str:
    """The ground-truth answer to `spec` about `scene` (pure; raises if the question is invalid)."""
    yes_no = {True: "yes", False: "no"}
    match spec.category:
        case "color" | "shape":
            at = next((o for o in scene.objects if o.position == spec.position), None)
            o = _require(at, spec)
            if (spec.shape or o.shape) != o.shape or (spec.color or o.color) != o.color:
                raise ValueError(f"no such object at the {spec.position}: {spec}")
            return o.color if spec.category == "color" else o.shape
        case "size":
            return _require(scene.find(spec.color, spec.shape), spec).size
        case "position":
            return _require(scene.find(spec.color, spec.shape), spec).position
        case "existence":
            return yes_no[scene.find(spec.color, spec.shape) is not None]
        case "count":
            n = sum(1 for o in scene.objects if spec.count_by == "all"
                    or (spec.count_by == "color" and o.color == spec.color)
                    or (spec.count_by == "shape" and o.shape == spec.shape))
            return str(n)
        case "spatial":
            a = _require(scene.find(spec.color, spec.shape), spec)
            b = _require(scene.find(spec.color2, spec.shape2), spec)
            return yes_no[relation_holds(a, b, spec.relation)]
        case "closest" | "furthest":
            anchor = _require(scene.find(spec.color, spec.shape), spec)
            found = extreme_object(scene, anchor, spec.category)
            if found is None:
                raise ValueError(f"no single {spec.category} object: {spec}")
            return getattr(found, spec.ask)
        case "same":
            anchor = _require(scene.find(spec.color, spec.shape), spec)
            return str(sum(1 for o in scene.objects
                           if o is not anchor and getattr(o, spec.count_by) == getattr(anchor, spec.count_by)))
    raise ValueError(f"unknown question category {spec.category!r}")


def _pick(rng: np.random.Generator, items: list | tuple):
    return items[int(rng.integers(len(items)))]


def make_question(scene: Scene, category: Category, rng: np.random.Generator,
                  want_yes: bool | None = None) -> QuestionSpec | None:
    """A random valid question of `category`; `want_yes` fixes yes/no answers (default: coin).
    None where the scene has none (closest / furthest: fewer than 3 objects, or ties only)."""
    if category in RELATIONAL:
        return _relational_question(scene, category, rng)
    o = _pick(rng, scene.objects)
    if want_yes is None:
        want_yes = bool(rng.random() < 0.5)
    match category:
        case "color":
            return QuestionSpec("color", shape=o.shape, position=o.position)
        case "shape":
            return QuestionSpec("shape", color=o.color, position=o.position)
        case "size" | "position":
            return QuestionSpec(category, color=o.color, shape=o.shape)
        case "existence":
            if not want_yes:
                absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if scene.find(c, s) is None]
                c, s = _pick(rng, absent)
                return QuestionSpec("existence", color=c, shape=s)
            return QuestionSpec("existence", color=o.color, shape=o.shape)
        case "count":
            by: CountBy = _pick(rng, ("color", "shape", "all"))
            color = (o.color if rng.random() < 0.5 else _pick(rng, COLOR_NAMES)) if by == "color" else None
            shape = _pick(rng, SHAPES) if by == "shape" else None
            return QuestionSpec("count", color=color, shape=shape, count_by=by)
        case "spatial":
            i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
            a, b = scene.objects[i], scene.objects[j]
            relation = _pick(rng, [r for r in RELATIONS if relation_holds(a, b, r) == want_yes])
            return QuestionSpec("spatial", color=a.color, shape=a.shape, relation=relation,
                                color2=b.color, shape2=b.shape)
    raise ValueError(f"unknown question category {category!r}")


def _relational_question(scene: Scene, category: Category, rng: np.random.Generator) -> QuestionSpec | None:
    if category == "same":  # half of the time one whose answer is not 0, where the scene has one
        pairs = [(o, a) for o in scene.objects for a in ATTRIBUTES]
        shared = [(o, a) for o, a in pairs
                  if any(p is not o and getattr(p, a) == getattr(o, a) for p in scene.objects)]
        o, attribute = _pick(rng, shared if shared and rng.random() < 0.5 else pairs)
        return QuestionSpec("same", color=o.color, shape=o.shape, count_by=attribute)
    if len(scene.objects) < 3:  # with one other object, "closest" would only ask for it
        return None
    anchors = [o for o in scene.objects if extreme_object(scene, o, category) is not None]
    if not anchors:
        return None
    o = _pick(rng, anchors)
    return QuestionSpec(category, color=o.color, shape=o.shape, ask=_pick(rng, ATTRIBUTES))
