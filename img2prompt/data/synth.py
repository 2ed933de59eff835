"""The embedded default dataset: images rendered with PIL from compositional prompts.

Each prompt is written the way people write text-to-image prompts ("two large red
triangles on the left and a small blue star, on a dark green background, pixel art") and
every attribute family in it is visible in the picture: count, size, colour and shape of
the main objects, their position, an optional second object, the background colour and
the rendering style. ``attributes.csv`` records the families per image for error analysis.
The same seed gives byte-identical files.
"""

import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from img2prompt.config import StudyConfig
from img2prompt.errors import DataError
from img2prompt.storage.files import atomic_path, write_csv, write_json
from img2prompt.storage.ownership import claim

COUNTS = {"a": 1, "two": 2, "three": 3}
SIZES = {"small": 0.075, "large": 0.14}  # object radius as a fraction of the image side
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 30),
    "green": (40, 170, 60), "blue": (40, 90, 225), "purple": (140, 60, 190),
    "pink": (245, 120, 185), "white": (245, 245, 245), "black": (20, 20, 20),
    "cyan": (40, 205, 215),
}
SHAPES = {  # singular -> plural
    "circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
    "hexagon": "hexagons", "heart": "hearts", "ring": "rings", "cross": "crosses",
    "diamond": "diamonds",
}
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
BACKGROUNDS = {
    "dark green": (25, 75, 45), "navy blue": (20, 30, 85), "light gray": (200, 200, 200),
    "beige": (232, 216, 180), "black": (10, 10, 10), "white": (250, 250, 250),
    "maroon": (105, 20, 35), "sky blue": (140, 200, 240),
}
STYLES = ("flat vector art", "outline sketch", "blurry photo", "pixel art",
          "film grain photo", "neon art", "pastel illustration")
FAMILIES = ("count", "size", "color", "shape", "position", "second_object", "background",
            "style")
MIN_CONTRAST = 110  # least colour distance between an object and its background
REPEAT_PROMPT_PROBABILITY = 0.25  # real data holds several images per prompt
SUPERSAMPLE = 2  # draw at twice the size, then downsample: anti-aliased edges


@dataclass(frozen=True)
class SceneSpec:
    """The attributes of one image; ``second_*`` are empty when there is no second object."""

    count: str
    size: str
    color: str
    shape: str
    position: str
    background: str
    style: str
    second_size: str = ""
    second_color: str = ""
    second_shape: str = ""

    @property
    def second_object(self) -> str:
        if not self.second_shape:
            return "none"
        return f"{self.second_size} {self.second_color} {self.second_shape}"

    def attributes(self) -> dict:
        return {family: getattr(self, family) for family in FAMILIES}

    def prompt(self, template: int = 0) -> str:
        noun = self.shape if self.count == "a" else SHAPES[self.shape]
        objects = f"{_article(self.count, self.size)} {self.size} {self.color} {noun} {self.position}"
        if self.second_shape:
            objects += f" and {_article('a', self.second_size)} {self.second_object}"
        if template == 1:
            return f"{self.style} of {objects}, {self.background} background"
        return f"{objects}, on a {self.background} background, {self.style}"


def _article(count, next_word):
    if count != "a":
        return count
    return "an" if next_word[0] in "aeiou" else "a"


def sample_spec(rng: np.random.Generator) -> SceneSpec:
    background = _choice(rng, list(BACKGROUNDS))
    visible = [c for c in COLORS if math.dist(COLORS[c], BACKGROUNDS[background]) >= MIN_CONTRAST]
    color = _choice(rng, visible)
    spec = dict(
        count=_choice(rng, list(COUNTS)), size=_choice(rng, list(SIZES)), color=color,
        shape=_choice(rng, list(SHAPES)), position=_choice(rng, POSITIONS),
        background=background, style=_choice(rng, STYLES),
    )
    if rng.random() < 0.5:
        spec.update(second_size=_choice(rng, list(SIZES)),
                    second_color=_choice(rng, [c for c in visible if c != color]),
                    second_shape=_choice(rng, list(SHAPES)))
    return SceneSpec(**spec)


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _alternatives(words):
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT = re.compile(rf"\b(a|an|two|three) ({_alternatives(SIZES)}) ({_alternatives(COLORS)}) "
                     rf"({_alternatives(list(SHAPES) + list(SHAPES.values()))})\b")
_BACKGROUND = re.compile(rf"\b({_alternatives(BACKGROUNDS)}) background\b")
_SINGULAR = {plural: singular for singular, plural in SHAPES.items()}


def parse_prompt(text: str) -> dict:
    """The attribute families a prompt states (None where it states none): the inverse of
    ``SceneSpec.prompt``, tolerant of free text so that generated prompts can be scored."""
    text = " ".join(str(text).lower().split())
    found = dict.fromkeys(FAMILIES)
    objects = list(_OBJECT.finditer(text))
    if objects:
        count, size, color, shape = objects[0].groups()
        found.update(count="a" if count == "an" else count, size=size, color=color,
                     shape=_SINGULAR.get(shape, shape))
        if len(objects) > 1:
            size, color, shape = objects[1].groups()[1:]
            found["second_object"] = f"{size} {color} {_SINGULAR.get(shape, shape)}"
        else:
            found["second_object"] = "none"
    found["position"] = next((p for p in POSITIONS if p in text), None)
    background = _BACKGROUND.search(text)
    found["background"] = background.group(1) if background else None
    found["style"] = next((s for s in STYLES if s in text), None)
    return found


# --- rendering -------------------------------------------------------------------------

def _polygon(shape, cx, cy, r, rotation):
    """Vertices of a shape centred at (cx, cy) with radius r, rotated by ``rotation``."""
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3 / 17
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17
        points = np.stack([x, y + 0.1], axis=1)
    elif shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif shape == "cross":
        a = 0.33
        points = np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1),
                           (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=float)
    elif shape == "diamond":
        points = np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=float)
    else:
        sides, offset = {"triangle": (3, -np.pi / 2), "square": (4, np.pi / 4),
                         "hexagon": (6, 0.0)}[shape]
        angles = np.arange(sides) * 2 * np.pi / sides + offset
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        if shape == "triangle":
            points[:, 1] += 0.2  # centre the triangle's area on the anchor
    cos, sin = math.cos(rotation), math.sin(rotation)
    rotated = points @ np.array([[cos, sin], [-sin, cos]])
    return [(cx + r * x, cy + r * y) for x, y in rotated]


def _draw_shape(draw, shape, cx, cy, r, rotation, fill, outline_only, width):
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if outline_only:
            draw.ellipse(box, outline=fill, width=width)
            if shape == "ring":
                inner = r * 0.55
                draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=fill, width=width)
        elif shape == "ring":
            draw.ellipse(box, outline=fill, width=max(1, round(r * 0.45)))
        else:
            draw.ellipse(box, fill=fill)
        return
    points = _polygon(shape, cx, cy, r, rotation)
    if outline_only:
        draw.polygon(points, outline=fill, width=width)
    else:
        draw.polygon(points, fill=fill)


def _layout(spec: SceneSpec, rng):
    """Object centres and radii (fractions of the side) for the main group and second object."""
    n, r = COUNTS[spec.count], SIZES[spec.size]
    spacing = 2.3 * r
    offsets = (np.arange(n) - (n - 1) / 2) * spacing
    jitter = lambda: rng.uniform(-0.025, 0.025)
    anchor, along_x = {
        "on the left": ((0.27, 0.5), False), "on the right": ((0.73, 0.5), False),
        "at the top": ((0.5, 0.27), True), "at the bottom": ((0.5, 0.73), True),
        "in the center": ((0.5, 0.5), True),
    }[spec.position]
    objects = []
    for offset in offsets:
        x, y = anchor
        x, y = (x + offset, y) if along_x else (x, y + offset)
        objects.append((spec.shape, spec.color, x + jitter(), y + jitter(), r))
    if spec.second_shape:
        r2 = SIZES[spec.second_size]
        if spec.position == "in the center":
            x2, y2 = [(0.17, 0.17), (0.83, 0.17), (0.17, 0.83), (0.83, 0.83)][int(rng.integers(4))]
        else:
            x2, y2 = {"on the left": (0.78, 0.5), "on the right": (0.22, 0.5),
                      "at the top": (0.5, 0.8), "at the bottom": (0.5, 0.2)}[spec.position]
            x2 += jitter()
            y2 += jitter()
        objects.append((spec.second_shape, spec.second_color, x2, y2, r2))
    return objects


def render(spec: SceneSpec, size: int = 256, seed=0) -> Image.Image:
    """Render one image of ``spec``; ``seed`` drives placement jitter, rotation and grain."""
    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    style = spec.style
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    outline = style in ("outline sketch", "neon art")
    width = max(2, round(big * 0.018))
    layer = Image.new("RGB", (big, big), (0, 0, 0)) if style == "neon art" else image
    draw = ImageDraw.Draw(layer)
    for shape, color, x, y, r in _layout(spec, rng):
        rotation = rng.uniform(-0.2, 0.2)
        _draw_shape(draw, shape, x * big, y * big, r * big, rotation, COLORS[color], outline, width)
    if style == "neon art":
        # a soft halo added to the background, then the sharp tube in its true colour
        glow = layer.filter(ImageFilter.GaussianBlur(big * 0.02))
        image = ImageChops.add(image, glow)
        image.paste(layer, mask=layer.convert("L").point(lambda v: 255 if v else 0))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if style == "blurry photo":
        image = image.filter(ImageFilter.GaussianBlur(size * 0.014))
    elif style == "pixel art":
        cells = max(8, size // 8)
        image = image.resize((cells, cells), Image.Resampling.BOX).resize(
            (size, size), Image.Resampling.NEAREST)
    elif style == "film grain photo":
        pixels = np.asarray(image, dtype=np.int16)
        grain = rng.normal(0, 28, size=pixels.shape[:2])[..., None]
        image = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
    elif style == "pastel illustration":
        image = Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), 0.45)
    return image


# --- dataset generation ----------------------------------------------------------------

@dataclass(frozen=True)
class SynthParams:
    n: int = StudyConfig.n_images
    size: int = StudyConfig.image_size
    seed: int = StudyConfig.seed


def plan_dataset(params: SynthParams) -> pd.DataFrame:
    """The rows of a generated dataset: imgId, prompt, attributes and a render seed each."""
    rng = np.random.default_rng([params.seed, 0])
    rows = []
    for index in range(params.n):
        if rows and rng.random() < REPEAT_PROMPT_PROBABILITY:
            earlier = rows[int(rng.integers(len(rows)))]
            spec, prompt = earlier["spec"], earlier["prompt"]
        else:
            spec = sample_spec(rng)
            prompt = spec.prompt(template=int(rng.random() < 0.3))
        rows.append({"imgId": f"synth_{index:06d}", "prompt": prompt, "spec": spec})
    return pd.DataFrame(rows)


def _render_to_file(job):
    spec, size, seed, path = job
    with atomic_path(path) as tmp:
        render(spec, size, seed).save(tmp, format="PNG", compress_level=3)


def generate_dataset(out_dir, params: SynthParams = SynthParams(), force=False, workers=None) -> Path:
    """Write ``images/``, ``prompts.csv``, ``attributes.csv`` and ``synth.json`` to ``out_dir``.

    An existing dataset made with the same parameters is kept as it is; one made
    differently is only replaced with ``force``, and only in a folder the project made
    (it removes only the files it wrote there). ``synth.json`` is written last.
    """
    out_dir = Path(out_dir)
    if params.n < 1 or params.size < 32:
        raise DataError(f"synth: need n >= 1 and size >= 32 (got n={params.n}, size={params.size}).")
    marker = out_dir / "synth.json"
    wanted = {"generator": "img2prompt.synth/1", **asdict(params)}
    if marker.exists() and not force:
        if json.loads(marker.read_text()) == wanted:
            return out_dir
        raise DataError(f"{out_dir}: holds a generated dataset with other parameters "
                        f"({marker.read_text().strip()}). Choose another --out or pass --force.")
    folder = claim(out_dir, "dataset")
    with folder.lock(f"dataset folder {out_dir}"):
        folder.clear()  # an earlier (or interrupted) generation: only what it wrote
        _generate(folder, params, workers)
        write_json(marker, wanted)
    return out_dir


def _generate(folder, params, workers):
    out_dir = folder.root
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_dataset(params)
    jobs = [(spec, params.size, [params.seed, 1, index], images_dir / f"{img_id}.png")
            for index, (img_id, spec) in enumerate(zip(plan["imgId"], plan["spec"]))]
    folder.record(*(job[3] for job in jobs))  # one manifest append for all the images
    workers = workers or min(4, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 50:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_to_file, jobs, chunksize=32):
                pass
    else:
        for job in jobs:
            _render_to_file(job)
    attributes = pd.DataFrame([spec.attributes() for spec in plan["spec"]])
    attributes.insert(0, "imgId", plan["imgId"])
    write_csv(out_dir / "attributes.csv", attributes)
    write_csv(out_dir / "prompts.csv", plan[["imgId", "prompt"]])


def study_dataset(config) -> str:
    """The dataset folder of a StudyConfig: its ``data_dir``, or when that is empty the
    generated default data of its settings (made when missing)."""
    if config.data_dir:
        return config.data_dir
    folder = config.generated_data_dir()
    generate_dataset(folder, SynthParams(config.n_images, config.image_size, config.seed))
    return folder
