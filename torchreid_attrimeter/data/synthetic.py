"""The synthetic attribute-person dataset: seeded drawings of pedestrian-like figures with Market-1501
attribute labels, written in the Market-1501 folder / file-name layout with a ``market_attribute.mat``
in the real file's layout.

What varies:
- identity-level attributes (Market names): gender (shoulder / hip silhouette), hair length, sleeve
  length (``up``), lower-body length (``down``), dress vs pants (``clothes``), hat, backpack, bag,
  handbag, age (young: smaller figure, old: grey hair), one of 8 upper and one of 9 lower colours;
- identity nuisance, so identities can share every attribute and still differ: height, build, skin
  tone, hair / shoe / accessory colours, colour shade, clothing texture, which side bags are carried;
- camera nuisance: background, lighting, colour cast, scale, position, blur, noise, occluders;
- per image (the "view"): stride, arm swing, facing direction, small shifts, noise pattern.

Rendering is a pure function of (identity, camera, view), so ``render_counterfactual`` redraws the
same identity, camera and pose with exactly one attribute (or one colour) changed.

Images are 128x64 (height x width): drawn at twice that size and downsampled, which keeps generation
(~5,000 images in about 10 s) and training of the small demo target fast on CPU.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from torchreid_attrimeter.errors import AttriMeterError

__all__ = [
    "BINARY_ATTRIBUTES",
    "LOWER_COLOURS",
    "UPPER_COLOURS",
    "CameraSpec",
    "IdentitySpec",
    "PlannedImage",
    "SyntheticDatasetError",
    "SyntheticPlan",
    "ViewSpec",
    "counterfactual_identity",
    "generate_synthetic_dataset",
    "load_synthetic_plan",
    "plan_synthetic_dataset",
    "render_counterfactual",
    "render_person",
]

GENERATOR_VERSION = 1
DATASET_DIR = "synthetic_attr"
MANIFEST = "manifest.json"
IMAGE_SIZE = (128, 64)  # (height, width)

# Market attributes encoded 1 = first option, 2 = second option (see design/attributes.md).
BINARY_ATTRIBUTES = ("gender", "hair", "up", "down", "clothes", "hat", "backpack", "bag", "handbag")
UPPER_COLOURS = {
    "upblack": (30, 30, 34), "upwhite": (228, 228, 222), "upred": (196, 32, 38), "uppurple": (112, 48, 150),
    "upyellow": (226, 200, 40), "upgray": (128, 128, 128), "upblue": (36, 70, 180), "upgreen": (40, 140, 60),
}
LOWER_COLOURS = {
    "downblack": (28, 28, 32), "downwhite": (226, 226, 220), "downpink": (236, 140, 180),
    "downpurple": (110, 46, 140), "downyellow": (220, 196, 50), "downgray": (124, 124, 128),
    "downblue": (40, 66, 150), "downgreen": (46, 120, 58), "downbrown": (110, 70, 36),
}
_SKIN_TONES = ((255, 220, 190), (236, 190, 150), (200, 150, 110), (150, 100, 70), (100, 66, 46))
_HAIR_COLOURS = ((20, 16, 14), (60, 40, 24), (110, 74, 40), (190, 160, 100))
_GREY_HAIR = (190, 190, 190)
# The real Market file stores splits and fields in no fixed order; these orders mimic that.
_MAT_SPLIT_ORDER = ("test", "train")


class SyntheticDatasetError(AttriMeterError, RuntimeError):
    """The synthetic dataset folder exists but does not match what was asked for."""


class SyntheticParameterError(AttriMeterError, ValueError):
    """Generator parameters it cannot honour (too few identities, cameras outside 2..6, ...)."""


@dataclass(frozen=True)
class IdentitySpec:
    """One person: Market labels (file values: 1/2 binaries, age 1..4, colour names) and nuisance."""

    pid: int
    labels: dict  # binary attribute -> 1 | 2, plus 'age' -> 1..4
    upper_colour: str  # a key of UPPER_COLOURS
    lower_colour: str  # a key of LOWER_COLOURS
    height: float
    build: float
    skin: tuple
    hair_colour: tuple
    shoe_colour: tuple
    accessory_colour: tuple
    hat_colour: tuple
    shade: tuple  # per-channel multipliers of the garment colours
    texture: str  # 'plain' | 'stripes' | 'logo' | 'two-tone'
    texture_colour: tuple
    carry_side: int  # +1 / -1: side of bag and handbag

    def market_labels(self) -> dict[str, int]:
        """All 27 Market fields with their file values (1 = no / first option, 2 = yes / second)."""
        labels = {name: int(self.labels[name]) for name in BINARY_ATTRIBUTES}
        labels["age"] = int(self.labels["age"])
        for colour in UPPER_COLOURS:
            labels[colour] = 2 if colour == self.upper_colour else 1
        for colour in LOWER_COLOURS:
            labels[colour] = 2 if colour == self.lower_colour else 1
        return labels


@dataclass(frozen=True)
class CameraSpec:
    camera: int  # 1-based, as in file names
    wall: tuple
    floor: tuple
    horizon: float
    pillars: tuple  # ((x fraction, width fraction, colour), ...)
    brightness: float
    cast: tuple
    scale: float
    blur: float
    noise: float
    occlusion_rate: float


@dataclass(frozen=True)
class ViewSpec:
    seed: int
    stride: float  # -1..1 leg spread
    swing: float  # -1..1 arm swing
    facing: int  # +1 / -1
    dx: float
    dy: float
    scale: float
    background_shift: float
    occluder: tuple | None  # (x0, y0, x1, y1 fractions, colour) or None


@dataclass(frozen=True)
class PlannedImage:
    name: str  # file name, e.g. 0002_c1s1_000451_01.jpg
    folder: str  # bounding_box_train | query | bounding_box_test
    identity: IdentitySpec | None  # None for junk (-1)
    camera: CameraSpec
    view: ViewSpec


@dataclass
class SyntheticPlan:
    parameters: dict
    identities: dict[int, IdentitySpec]
    cameras: dict[int, CameraSpec]
    images: list[PlannedImage] = field(default_factory=list)
    train_pids: list[int] = field(default_factory=list)
    test_pids: list[int] = field(default_factory=list)

    def image(self, name: str) -> PlannedImage:
        for planned in self.images:
            if planned.name == name:
                return planned
        raise KeyError(f"no image named '{name}' in the synthetic dataset plan")


# --- planning (all randomness lives here) ----------------------------------------------------------


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _colour(rng: np.random.Generator, base: Sequence[int], spread: int) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)


def _sample_identity(pid: int, rng: np.random.Generator) -> IdentitySpec:
    female = rng.random() < 0.42
    age = int(rng.choice([1, 2, 3, 4], p=[0.06, 0.16, 0.66, 0.12]))
    labels = {
        "gender": 2 if female else 1,
        "hair": 2 if rng.random() < (0.8 if female else 0.12) else 1,
        "up": 2 if rng.random() < 0.6 else 1,
        "down": 2 if rng.random() < 0.38 else 1,
        "clothes": 1 if female and rng.random() < 0.4 else 2,
        "hat": 2 if rng.random() < 0.15 else 1,
        "backpack": 2 if rng.random() < 0.3 else 1,
        "bag": 2 if rng.random() < 0.25 else 1,
        "handbag": 2 if rng.random() < (0.25 if female else 0.08) else 1,
        "age": age,
    }
    texture = str(rng.choice(["plain", "plain", "stripes", "logo", "two-tone"]))
    return IdentitySpec(
        pid=pid, labels=labels,
        upper_colour=str(rng.choice(list(UPPER_COLOURS))),
        lower_colour=str(rng.choice(list(LOWER_COLOURS), p=[0.2, 0.08, 0.06, 0.06, 0.06, 0.14, 0.22, 0.06, 0.12])),
        height=float(rng.uniform(0.86, 1.0)),
        build=float(rng.uniform(0.85, 1.15)),
        skin=_colour(rng, _SKIN_TONES[rng.integers(len(_SKIN_TONES))], 10),
        hair_colour=_colour(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 8),
        shoe_colour=_colour(rng, (rng.integers(20, 236),) * 3, 30),
        accessory_colour=tuple(int(c) for c in rng.integers(20, 236, 3)),
        hat_colour=tuple(int(c) for c in rng.integers(20, 236, 3)),
        shade=tuple(float(s) for s in rng.uniform(0.88, 1.1, 3)),
        texture=texture,
        texture_colour=tuple(int(c) for c in rng.integers(0, 256, 3)),
        carry_side=int(rng.choice([-1, 1])),
    )


def _sample_camera(camera: int, rng: np.random.Generator) -> CameraSpec:
    pillars = tuple(
        (float(rng.uniform(0, 1)), float(rng.uniform(0.05, 0.25)), tuple(int(c) for c in rng.integers(40, 220, 3)))
        for _ in range(int(rng.integers(2, 6)))
    )
    return CameraSpec(
        camera=camera,
        wall=tuple(int(c) for c in rng.integers(60, 200, 3)),
        floor=tuple(int(c) for c in rng.integers(50, 170, 3)),
        horizon=float(rng.uniform(0.5, 0.8)),
        pillars=pillars,
        brightness=float(rng.uniform(0.75, 1.2)),
        cast=tuple(float(c) for c in rng.uniform(0.88, 1.12, 3)),
        scale=float(rng.uniform(0.85, 1.0)),
        blur=float(rng.uniform(0.0, 0.9)),
        noise=float(rng.uniform(2.0, 9.0)),
        occlusion_rate=float(rng.uniform(0.0, 0.3)),
    )


def _sample_view(rng: np.random.Generator, camera: CameraSpec) -> ViewSpec:
    occluder = None
    if rng.random() < camera.occlusion_rate:
        if rng.random() < 0.5:  # a pole or a passer-by's edge at one side
            x0 = float(rng.choice([rng.uniform(-0.1, 0.15), rng.uniform(0.65, 0.9)]))
            occluder = (x0, 0.0, x0 + float(rng.uniform(0.15, 0.3)), 1.0)
        else:  # something low in front of the legs
            occluder = (-0.1, float(rng.uniform(0.72, 0.88)), 1.1, 1.1)
        occluder = occluder + (tuple(int(c) for c in rng.integers(30, 220, 3)),)
    return ViewSpec(
        seed=int(rng.integers(0, 2**31 - 1)),
        stride=float(rng.uniform(-1, 1)),
        swing=float(rng.uniform(-1, 1)),
        facing=int(rng.choice([-1, 1])),
        dx=float(rng.uniform(-0.06, 0.06)),
        dy=float(rng.uniform(-0.03, 0.03)),
        scale=float(rng.uniform(0.94, 1.04)),
        background_shift=float(rng.uniform(-0.15, 0.15)),
        occluder=occluder,
    )


def default_parameters(**overrides: Any) -> dict:
    parameters = {
        "num_train_identities": 400,  # 160 left the demo target at R1 75 (it learnt the cameras)
        "num_test_identities": 100,
        "num_cameras": 6,
        "min_images_per_identity": 8,
        "max_images_per_identity": 12,
        "max_queries_per_identity": 2,
        "num_distractor_images": 40,
        "num_junk_images": 10,
        "image_height": IMAGE_SIZE[0],
        "image_width": IMAGE_SIZE[1],
        "seed": 0,
        "generator_version": GENERATOR_VERSION,
    }
    unknown = sorted(set(overrides) - set(parameters))
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s) {unknown}; known: {sorted(parameters)}")
    parameters.update(overrides)
    return parameters


def _check_parameters(p: dict) -> None:
    total = p["num_train_identities"] + p["num_test_identities"]
    problems = []
    if p["num_train_identities"] < 2 or p["num_test_identities"] < 1:
        problems.append("need at least 2 train and 1 test identities")
    if total > 1500:
        problems.append(f"at most 1500 identities fit Market-1501 names (asked {total})")
    if not 2 <= p["num_cameras"] <= 6:
        problems.append(f"num_cameras must be 2..6 (Market-1501 names; asked {p['num_cameras']})")
    if not 2 <= p["min_images_per_identity"] <= p["max_images_per_identity"]:
        problems.append("need 2 <= min_images_per_identity <= max_images_per_identity")
    if p["max_queries_per_identity"] < 1:
        problems.append("max_queries_per_identity must be >= 1")
    if p["image_height"] < 32 or p["image_width"] < 16:
        problems.append("images must be at least 32x16")
    if problems:
        raise SyntheticParameterError("invalid synthetic dataset parameters: " + "; ".join(problems))


def plan_synthetic_dataset(**parameters: Any) -> SyntheticPlan:
    """Every identity, camera, view and file name of the dataset, derived from the seed alone."""
    p = default_parameters(**parameters)
    _check_parameters(p)
    seed = int(p["seed"])
    num_train, num_test = p["num_train_identities"], p["num_test_identities"]
    split_rng = _rng(seed, 0)
    pids = sorted(int(x) for x in split_rng.choice(np.arange(1, 1501), size=num_train + num_test, replace=False))
    is_train = np.zeros(len(pids), bool)
    is_train[split_rng.choice(len(pids), size=num_train, replace=False)] = True
    cameras = {c: _sample_camera(c, _rng(seed, 1, c)) for c in range(1, p["num_cameras"] + 1)}
    plan = SyntheticPlan(parameters=p, identities={}, cameras=cameras)
    frame = 0
    for index, pid in enumerate(pids):
        rng = _rng(seed, 2, pid)
        identity = _sample_identity(pid, rng)
        plan.identities[pid] = identity
        count = int(rng.integers(p["min_images_per_identity"], p["max_images_per_identity"] + 1))
        seen = rng.choice(list(cameras), size=int(rng.integers(2, min(4, len(cameras)) + 1)), replace=False)
        # every seen camera gets at least one image, so test identities can be queried across cameras
        image_cameras = list(seen) + list(rng.choice(seen, size=max(count - len(seen), 0)))
        queried: set[int] = set()
        for shot, camera in enumerate(image_cameras):
            frame += int(rng.integers(20, 400))
            camera = int(camera)
            name = f"{pid:04d}_c{camera}s{1 + shot % 6}_{frame:06d}_{1 + shot % 8:02d}.jpg"
            view = _sample_view(rng, cameras[camera])
            if is_train[index]:
                folder = "bounding_box_train"
            elif camera not in queried and len(queried) < p["max_queries_per_identity"]:
                folder = "query"
                queried.add(camera)
            else:
                folder = "bounding_box_test"
            plan.images.append(PlannedImage(name, folder, identity, cameras[camera], view))
        (plan.train_pids if is_train[index] else plan.test_pids).append(pid)
    extra_rng = _rng(seed, 3)
    for kind, count in (("distractor", p["num_distractor_images"]), ("junk", p["num_junk_images"])):
        for _ in range(count):
            frame += int(extra_rng.integers(20, 400))
            camera = int(extra_rng.integers(1, len(cameras) + 1))
            view = _sample_view(extra_rng, cameras[camera])
            if kind == "distractor":  # an unlabelled person (pid 0), as Market's background class
                identity = _sample_identity(0, extra_rng)
                name = f"0000_c{camera}s1_{frame:06d}_01.jpg"
            else:  # junk: background only (pid -1), skipped by torchreid's reader
                identity = None
                name = f"-1_c{camera}s1_{frame:06d}_01.jpg"
            plan.images.append(PlannedImage(name, "bounding_box_test", identity, cameras[camera], view))
    return plan


# --- drawing (no randomness except the view's seeded noise) --------------------------------------


def _scaled(colour: Sequence[int], factors: Sequence[float]) -> tuple:
    return tuple(int(np.clip(c * f, 0, 255)) for c, f in zip(colour, factors))


def _draw_background(draw: ImageDraw.ImageDraw, camera: CameraSpec, view: ViewSpec, w: int, h: int) -> None:
    horizon = int(camera.horizon * h)
    draw.rectangle((0, 0, w, horizon), fill=camera.wall)
    draw.rectangle((0, horizon, w, h), fill=camera.floor)
    for x_fraction, width_fraction, colour in camera.pillars:
        x0 = ((x_fraction + view.background_shift) % 1.2 - 0.1) * w
        draw.rectangle((x0, 0, x0 + width_fraction * w, horizon), fill=colour)
    for k in range(1, 4):  # floor lines give the ground some perspective
        y = horizon + (h - horizon) * k / 4
        draw.line((0, y, w, y), fill=_scaled(camera.floor, (0.85, 0.85, 0.85)), width=1)


def _garment_layer(size: tuple[int, int], colour: tuple, texture: str, texture_colour: tuple,
                   box: tuple[float, float, float, float]) -> Image.Image:
    """The upper garment's fill: plain colour with the identity's texture across the torso box."""
    layer = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    if texture == "stripes":
        step = max(3, int((y1 - y0) / 7))
        for y in range(int(y0), int(y1), step):
            draw.rectangle((0, y, size[0], y + step // 2 - 1), fill=_scaled(colour, (0.72, 0.72, 0.72)))
    elif texture == "logo":
        cx, cy = (x0 + x1) / 2, y0 + (y1 - y0) * 0.35
        half = (x1 - x0) * 0.16
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=texture_colour)
    elif texture == "two-tone":
        draw.rectangle((0, (y0 + y1) / 2, size[0], size[1]), fill=_scaled(colour, (0.8, 0.8, 0.8)))
    return layer


def render_person(identity: IdentitySpec | None, camera: CameraSpec, view: ViewSpec,
                  image_size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """Draw one image (PIL RGB, ``image_size`` = (height, width)); ``identity=None`` draws background only."""
    height, width = image_size
    w, h = 2 * width, 2 * height  # drawn at twice the size, then downsampled (anti-aliasing)
    canvas = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, camera, view, w, h)
    if identity is not None:
        _draw_figure(canvas, identity, camera, view)
    if view.occluder is not None:
        x0, y0, x1, y1, colour = view.occluder
        draw.rectangle((x0 * w, y0 * h, x1 * w, y1 * h), fill=colour)
    image = canvas.resize((width, height), Image.BILINEAR)
    if camera.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * camera.brightness * np.asarray(camera.cast, np.float32)
    pixels += np.random.default_rng(view.seed).normal(0.0, camera.noise, pixels.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def _draw_figure(canvas: Image.Image, person: IdentitySpec, camera: CameraSpec, view: ViewSpec) -> None:
    w, h = canvas.size
    draw = ImageDraw.Draw(canvas)
    labels = person.labels
    female = labels["gender"] == 2
    age_scale = {1: 0.8, 2: 0.92}.get(labels["age"], 1.0)
    tall = h * 0.86 * person.height * camera.scale * view.scale * age_scale  # figure height in px
    foot_y = h * (0.96 + view.dy)
    top_y = foot_y - tall
    cx = w * (0.5 + view.dx)
    side = view.facing  # mirrors asymmetric things (bags, backpack) with the facing direction
    skin = person.skin
    upper = _scaled(UPPER_COLOURS[person.upper_colour], person.shade)
    lower = _scaled(LOWER_COLOURS[person.lower_colour], person.shade)
    hair = _GREY_HAIR if labels["age"] == 4 else person.hair_colour

    r = 0.068 * tall  # head radius
    head_cy = top_y + r
    shoulder_y = top_y + 2 * r + 0.025 * tall
    hip_y = shoulder_y + 0.31 * tall
    waist_y = shoulder_y + 0.2 * tall
    shoulder = (0.135 if female else 0.175) * tall * person.build
    waist = (0.095 if female else 0.12) * tall * person.build
    hip = (0.15 if female else 0.12) * tall * person.build
    ankle_y = foot_y - 0.035 * tall
    knee_y = hip_y + 0.5 * (ankle_y - hip_y)
    limb = 0.07 * tall * person.build

    # backpack body sits behind the torso, sticking out on the side the person faces away from
    if labels["backpack"] == 2:
        bx = cx - side * shoulder * 0.2
        draw.rounded_rectangle(
            (min(bx, bx - side * (shoulder + 0.1 * tall)), shoulder_y + 0.01 * tall,
             max(bx, bx - side * (shoulder + 0.1 * tall)), shoulder_y + 0.25 * tall),
            radius=0.03 * tall, fill=person.accessory_colour)
    # long hair falls behind the head and shoulders
    if labels["hair"] == 2:
        draw.rectangle((cx - 1.05 * r, head_cy, cx + 1.05 * r, shoulder_y + 0.12 * tall), fill=hair)

    # legs
    stride = view.stride * 0.07 * tall
    feet = ((cx - 0.055 * tall - stride, ankle_y), (cx + 0.055 * tall + stride, ankle_y))
    dress = labels["clothes"] == 1
    short = labels["down"] == 2
    for foot_x, foot_y_ in feet:
        hip_x = cx + (0.055 * tall if foot_x > cx else -0.055 * tall)
        knee_x = (hip_x + foot_x) / 2
        if dress:
            draw.line((hip_x, hip_y, foot_x, foot_y_), fill=skin, width=int(limb * 0.8))
        elif short:
            draw.line((hip_x, hip_y, knee_x, knee_y), fill=lower, width=int(limb * 1.15))
            draw.line((knee_x, knee_y, foot_x, foot_y_), fill=skin, width=int(limb * 0.8))
        else:
            draw.line((hip_x, hip_y, foot_x, foot_y_), fill=lower, width=int(limb))
        draw.ellipse((foot_x - 0.055 * tall, foot_y_ - 0.015 * tall, foot_x + 0.055 * tall,
                      foot_y_ + 0.035 * tall), fill=person.shoe_colour)
    if dress:
        hem_y = knee_y if short else ankle_y - 0.02 * tall
        hem = hip * (1.5 if short else 1.7)
        draw.polygon([(cx - waist, waist_y), (cx + waist, waist_y), (cx + hem, hem_y), (cx - hem, hem_y)],
                     fill=lower)
    else:
        draw.polygon([(cx - hip, hip_y - 0.02 * tall), (cx + hip, hip_y - 0.02 * tall),
                      (cx + hip, hip_y + 0.05 * tall), (cx - hip, hip_y + 0.05 * tall)], fill=lower)

    # torso and arms, filled with the textured garment through a mask
    mask = Image.new("L", canvas.size, 0)
    mask_draw = ImageDraw.Draw(mask)
    torso = [(cx - shoulder, shoulder_y), (cx + shoulder, shoulder_y), (cx + waist, waist_y),
             (cx + hip, hip_y), (cx - hip, hip_y), (cx - waist, waist_y)]
    mask_draw.polygon(torso, fill=255)
    swing = view.swing * 0.06 * tall
    hands = []
    for sign in (-1, 1):
        shoulder_point = (cx + sign * shoulder * 0.9, shoulder_y + 0.025 * tall)
        hand = (cx + sign * (shoulder + 0.03 * tall) + sign * 0.3 * swing, hip_y + 0.02 * tall + sign * swing * 0.3)
        elbow = ((shoulder_point[0] + hand[0]) / 2, (shoulder_point[1] + hand[1]) / 2)
        sleeve_end = hand if labels["up"] == 1 else elbow
        draw.line((*shoulder_point, *hand), fill=skin, width=int(limb * 0.75))
        mask_draw.line((*shoulder_point, *sleeve_end), fill=255, width=int(limb * 0.95))
        mask_draw.ellipse((shoulder_point[0] - limb * 0.47, shoulder_point[1] - limb * 0.47,
                           shoulder_point[0] + limb * 0.47, shoulder_point[1] + limb * 0.47), fill=255)
        hands.append(hand)
    garment = _garment_layer(canvas.size, upper, person.texture, person.texture_colour,
                             (cx - shoulder, shoulder_y, cx + shoulder, hip_y))
    canvas.paste(garment, (0, 0), mask)
    draw = ImageDraw.Draw(canvas)

    if labels["backpack"] == 2:  # straps over the front
        for sign in (-1, 1):
            draw.line((cx + sign * shoulder * 0.55, shoulder_y, cx + sign * shoulder * 0.45, waist_y),
                      fill=person.accessory_colour, width=max(2, int(0.022 * tall)))
    if labels["bag"] == 2:  # shoulder bag: diagonal strap, bag at the opposite hip
        bag_side = person.carry_side * side
        draw.line((cx - bag_side * shoulder * 0.7, shoulder_y, cx + bag_side * hip, hip_y - 0.02 * tall),
                  fill=_scaled(person.accessory_colour, (0.7, 0.7, 0.7)), width=max(2, int(0.02 * tall)))
        bag_x = cx + bag_side * (hip + 0.02 * tall)
        draw.rectangle((bag_x - 0.07 * tall, hip_y - 0.06 * tall, bag_x + 0.07 * tall, hip_y + 0.05 * tall),
                       fill=_scaled(person.accessory_colour, (0.85, 0.9, 1.0)))
    if labels["handbag"] == 2:  # a small bag hanging from one hand
        hand_x, hand_y = hands[0] if person.carry_side * side < 0 else hands[1]
        draw.polygon([(hand_x - 0.04 * tall, hand_y + 0.01 * tall), (hand_x + 0.04 * tall, hand_y + 0.01 * tall),
                      (hand_x + 0.055 * tall, hand_y + 0.1 * tall), (hand_x - 0.055 * tall, hand_y + 0.1 * tall)],
                     fill=_scaled(person.hat_colour, (0.8, 0.6, 0.6)))

    # head, hair, hat
    draw.rectangle((cx - 0.35 * r, head_cy + 0.7 * r, cx + 0.35 * r, shoulder_y + 0.01 * tall), fill=skin)
    draw.ellipse((cx - 0.85 * r, head_cy - r, cx + 0.85 * r, head_cy + r), fill=skin)
    draw.chord((cx - 0.92 * r, head_cy - 1.08 * r, cx + 0.92 * r, head_cy + 0.5 * r), 180, 360, fill=hair)
    if labels["hair"] == 2:
        draw.rectangle((cx - 0.95 * r, head_cy - 0.2 * r, cx - 0.6 * r, head_cy + 1.3 * r), fill=hair)
        draw.rectangle((cx + 0.6 * r, head_cy - 0.2 * r, cx + 0.95 * r, head_cy + 1.3 * r), fill=hair)
    if labels["hat"] == 2:
        draw.rectangle((cx - 0.8 * r, head_cy - 1.45 * r, cx + 0.8 * r, head_cy - 0.45 * r), fill=person.hat_colour)
        draw.rectangle((cx - 1.3 * r, head_cy - 0.6 * r, cx + 1.3 * r, head_cy - 0.35 * r),
                       fill=_scaled(person.hat_colour, (0.75, 0.75, 0.75)))


# --- counterfactuals -------------------------------------------------------------------------------


def counterfactual_identity(identity: IdentitySpec, attribute: str, value: Any = None) -> IdentitySpec:
    """``identity`` with exactly one attribute changed, everything else (nuisance included) kept.

    ``attribute``: a binary Market attribute (``gender``, ``hair``, ``up``, ``down``, ``clothes``,
    ``hat``, ``backpack``, ``bag``, ``handbag``) — toggled, or set to ``value`` (0/1 or file value
    1/2); or a colour attribute (``'upred'``, ``'downblue'``, ...) — the upper / lower colour becomes
    that colour; or ``'upper_colour'`` / ``'lower_colour'`` with ``value`` a colour name (default: the
    next colour in the schema order). A colour change flips two colour attributes (old off, new on).
    """
    if attribute in BINARY_ATTRIBUTES:
        current = identity.labels[attribute]
        if value is None:
            new = 3 - current
        elif value in (0, 1, False, True):
            new = int(value) + 1
        elif value in (1, 2):
            new = int(value)
        else:
            raise ValueError(f"value for '{attribute}' must be 0/1 (or file value 1/2), got {value!r}")
        if new == current:
            raise ValueError(f"'{attribute}' of identity {identity.pid} already has value {new - 1}")
        return dataclasses.replace(identity, labels={**identity.labels, attribute: new})
    if attribute in UPPER_COLOURS or attribute in LOWER_COLOURS:
        attribute, value = ("upper_colour" if attribute in UPPER_COLOURS else "lower_colour"), attribute
    if attribute in ("upper_colour", "lower_colour"):
        palette = list(UPPER_COLOURS if attribute == "upper_colour" else LOWER_COLOURS)
        current = getattr(identity, attribute)
        if value is None:
            value = palette[(palette.index(current) + 1) % len(palette)]
        if value not in palette:
            raise ValueError(f"'{value}' is not one of the {attribute.replace('_', ' ')}s {palette}")
        if value == current:
            raise ValueError(f"identity {identity.pid} already has {attribute.replace('_', ' ')} '{value}'")
        return dataclasses.replace(identity, **{attribute: value})
    raise ValueError(
        f"cannot change '{attribute}': use one of {list(BINARY_ATTRIBUTES)}, a colour name, "
        f"'upper_colour' or 'lower_colour'"
    )


def render_counterfactual(identity: IdentitySpec, camera: CameraSpec, view: ViewSpec, attribute: str,
                          value: Any = None, image_size: tuple[int, int] = IMAGE_SIZE
                          ) -> tuple[Image.Image, IdentitySpec]:
    """The same identity, camera and pose with one attribute (or one colour) changed: returns the
    image and the changed identity (whose ``market_labels()`` give its labels)."""
    changed = counterfactual_identity(identity, attribute, value)
    return render_person(changed, camera, view, image_size), changed


# --- writing ---------------------------------------------------------------------------------------


_MAT_TEXT_HEADER_BYTES = 116
_MAT_TEXT_HEADER = b"MATLAB 5.0 MAT-file, written by torchreid_attrimeter.data.synthetic"


def _mat_split(identities: Sequence[IdentitySpec], rng: np.random.Generator) -> dict:
    fields = list(identities[0].market_labels()) if identities else []
    order = [fields[i] for i in rng.permutation(len(fields))]
    split: dict[str, Any] = {}
    labels = [person.market_labels() for person in identities]
    for name in order:
        split[name] = np.array([[row[name] for row in labels]], dtype=np.uint8)
    index = np.empty((1, len(identities)), dtype=object)
    for column, person in enumerate(identities):
        index[0, column] = f"{person.pid:04d}"
    split["image_index"] = index
    return split


def write_attribute_mat(path: str, plan: SyntheticPlan) -> None:
    """``market_attribute.mat`` in the real layout: struct ``market_attribute`` with splits ``test`` /
    ``train``, each with the 27 fields (uint8 1xN, order shuffled per split) and ``image_index``."""
    import scipy.io

    rng = _rng(int(plan.parameters["seed"]), 4)
    splits = {"train": plan.train_pids, "test": plan.test_pids}
    content = {name: _mat_split([plan.identities[pid] for pid in sorted(splits[name])], rng)
               for name in _MAT_SPLIT_ORDER}
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"market_attribute": content}, do_compression=False)
    data = bytearray(buffer.getvalue())
    # The MAT-5 header's 116-byte text field holds the creation time; a fixed text keeps the file
    # byte-identical for the same seed.
    data[:_MAT_TEXT_HEADER_BYTES] = _MAT_TEXT_HEADER.ljust(_MAT_TEXT_HEADER_BYTES)
    with open(path, "wb") as file:
        file.write(data)


def _manifest(plan: SyntheticPlan) -> dict:
    counts: dict[str, int] = {}
    for planned in plan.images:
        counts[planned.folder] = counts.get(planned.folder, 0) + 1
    return {
        "generator": "torchreid_attrimeter.data.synthetic",
        "parameters": plan.parameters,
        "image_counts": counts,
        "num_train_identities": len(plan.train_pids),
        "num_test_identities": len(plan.test_pids),
    }


def _check_existing(dataset_dir: str, plan: SyntheticPlan) -> None:
    manifest_path = os.path.join(dataset_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise SyntheticDatasetError(
            f"'{dataset_dir}' exists but has no {MANIFEST}: it was not made by this generator (or its "
            f"generation was interrupted). Remove it or choose another root; it is never overwritten."
        )
    with open(manifest_path, encoding="utf-8") as handle:
        existing = json.load(handle)
    wanted = plan.parameters
    had = existing.get("parameters", {})
    differing = {key: (had.get(key), wanted[key]) for key in wanted if had.get(key) != wanted[key]}
    if differing:
        detail = ", ".join(f"{key}: existing {old!r} vs requested {new!r}" for key, (old, new) in differing.items())
        raise SyntheticDatasetError(
            f"'{dataset_dir}' holds a synthetic dataset made with other parameters ({detail}). Remove the "
            f"folder or use another --root; it is never overwritten."
        )
    for folder, count in existing.get("image_counts", {}).items():
        path = os.path.join(dataset_dir, folder)
        found = len([n for n in os.listdir(path) if n.endswith(".jpg")]) if os.path.isdir(path) else 0
        if found != count:
            raise SyntheticDatasetError(
                f"'{path}' has {found} images but {MANIFEST} lists {count}: the dataset was modified. "
                f"Remove '{dataset_dir}' and generate it again."
            )
    if not os.path.isfile(os.path.join(dataset_dir, "market_attribute.mat")):
        raise SyntheticDatasetError(f"'{dataset_dir}' lacks market_attribute.mat: remove the folder and regenerate")


def generate_synthetic_dataset(root: str | os.PathLike, num_identities: int | None = None, seed: int = 0,
                               **parameters: Any) -> str:
    """Write ``<root>/synthetic_attr/`` (Market-1501 layout, ``market_attribute.mat``, ``manifest.json``)
    and return its path. ``num_identities`` (optional) is train + test identities, split 4:1 like
    the default 400 / 100; other keys: see ``default_parameters()``.

    Idempotent: an existing dataset made with the same parameters is reused as it is; one made with
    other parameters (or not by this generator) raises :class:`SyntheticDatasetError`, never
    overwritten. Generation writes to a temporary folder renamed into place at the end, so an
    interrupted run leaves nothing half-written behind.
    """
    if num_identities is not None:
        if num_identities < 3:
            raise SyntheticParameterError(f"num_identities must be at least 3, got {num_identities}")
        num_test = max(1, round(num_identities * 100 / 500))
        parameters.setdefault("num_train_identities", num_identities - num_test)
        parameters.setdefault("num_test_identities", num_test)
    plan = plan_synthetic_dataset(seed=seed, **parameters)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    dataset_dir = os.path.join(root, DATASET_DIR)
    if os.path.exists(dataset_dir):
        _check_existing(dataset_dir, plan)
        return dataset_dir
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{DATASET_DIR}.partial-", dir=root)
    try:
        for folder in ("bounding_box_train", "query", "bounding_box_test"):
            os.makedirs(os.path.join(staging, folder))
        size = (plan.parameters["image_height"], plan.parameters["image_width"])
        for planned in plan.images:
            image = render_person(planned.identity, planned.camera, planned.view, size)
            image.save(os.path.join(staging, planned.folder, planned.name), quality=92)
        write_attribute_mat(os.path.join(staging, "market_attribute.mat"), plan)
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(_manifest(plan), handle, indent=2, sort_keys=True)
        try:
            os.rename(staging, dataset_dir)
        except OSError:
            if not os.path.isdir(dataset_dir):
                raise
            # another process finished first: reuse its result if it matches
            _check_existing(dataset_dir, plan)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return dataset_dir


def load_synthetic_plan(root: str | os.PathLike) -> SyntheticPlan:
    """The plan (identities, cameras, views of every image) of a generated dataset, re-derived from
    its manifest's parameters; use it to render counterfactuals of the dataset's own images."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    dataset_dir = root if os.path.basename(root) == DATASET_DIR else os.path.join(root, DATASET_DIR)
    manifest_path = os.path.join(dataset_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(
            f"no synthetic dataset at '{dataset_dir}' ({MANIFEST} missing): generate it with "
            f"python tools/make_synthetic_dataset.py --root {root}"
        )
    with open(manifest_path, encoding="utf-8") as handle:
        parameters = dict(json.load(handle)["parameters"])
    if parameters.get("generator_version") != GENERATOR_VERSION:
        raise SyntheticDatasetError(
            f"'{dataset_dir}' was made by generator version {parameters.get('generator_version')}, this is "
            f"version {GENERATOR_VERSION}: regenerate it to render matching counterfactuals"
        )
    return plan_synthetic_dataset(**parameters)
