"""Slices of real public volumes for grounding and contrastive training: the head CT of Debian's
`invesalius-examples` (`Cranium.inv3`) and the T1 head MRI template of Debian's `mricron-data`
(Colin27 `ch2.nii.gz`), cut in three planes (and, for the CT, shown in several windows), so the
demo model sees head CT and MRI that were not acquired or exported the way MedPix's VQA-RAD JPEGs
were.

Why: version 5 named modality and organ well on VQA-RAD's images but not on images from other
sources. Every slice is labelled from the volume itself (modality from the file, plane from the
axis it was cut along, window from the intensity mapping), not from text. A fixed band of slice
positions of every source and plane is kept out of training (with a gap either side, because
neighbouring slices are nearly the same image) and written as an out-of-source validation set.
Training slices get augmentations that make a slice look acquired differently: contrast (gamma),
noise, blur, crop and rotation, none from ImageNet statistics.

Both volumes are read without extracting or unpickling anything: the .inv3 archive's plist and raw
int16 matrix by name, the NIfTI file through nibabel.
"""

from __future__ import annotations

import json
import plistlib
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from train.captions import MODALITY_PHRASE, keyed_rng, question_answer_turns, write_json_list, write_lines
from train.grounding import grounding_turns
from vlm.datasets import DataError

PLANES = ("axial", "coronal", "sagittal")
# CT windows as (level, width) in HU: the usual head-CT reading windows.
CT_WINDOWS = {"brain": (40, 80), "soft tissue": (40, 400), "bone": (500, 2000)}
HELDOUT_BAND = (0.40, 0.55)  # relative position within a plane's slices that show anatomy
GAP = 0.04  # slices this close to the band (relative) are used for neither training nor validation
IMAGE_SIDE = 256  # the longer side of a written slice, in pixels


@dataclass
class Volume:
    name: str  # short, for file names: "ct-cranium", "mri-colin27"
    modality: str  # "CT" or "MRI"
    data: np.ndarray  # float32 [x, y, z], RAS: +x to the patient's right, +y anterior, +z superior
    spacing: tuple[float, float, float]  # mm along x, y, z
    display: tuple[float, float] = (0.0, 0.0)  # MRI: the intensities shown as black and white
    body_threshold: float = 0.0  # MRI: the intensity above which a pixel is inside the body

    def __post_init__(self):
        if self.modality != "CT":  # percentiles of the whole volume, once (not per slice)
            low, high, top = (float(v) for v in np.percentile(self.data, (0.5, 99.5, 99)))
            self.display, self.body_threshold = (low, high), 0.1 * top


def read_invesalius(path: str | Path) -> Volume:
    """The CT volume of an InVesalius 3 project (.inv3: a tar.gz of main.plist and a raw matrix),
    in HU, as [x, y, z] with +y anterior and +z superior. Only the two members the plist names are
    read; nothing is extracted to disk."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise DataError(f"{path}: not an InVesalius project (no main.plist inside).")
            main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
            matrix = main.get("matrix") or {}
            shape, dtype = tuple(int(n) for n in matrix.get("shape", ())), str(matrix.get("dtype", ""))
            member = members.get(str(matrix.get("filename", "")))
            if len(shape) != 3 or dtype != "int16" or member is None:
                raise DataError(f"{path}: expected a 3-D int16 matrix, found shape {shape}, dtype {dtype!r}.")
            raw = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, plistlib.InvalidFileException, ValueError) as e:
        raise DataError(f"{path}: cannot read it as an InVesalius project ({type(e).__name__}).") from None
    if len(raw) != int(np.prod(shape)) * 2:
        raise DataError(f"{path}: the matrix holds {len(raw)} bytes, not {int(np.prod(shape)) * 2} for shape {shape}.")
    if str(main.get("modality", "")).upper() != "CT":
        raise DataError(f"{path}: the project's modality is {main.get('modality')!r}, not CT.")
    zyx = np.frombuffer(raw, dtype="<i2").reshape(shape).astype(np.float32)
    sx, sy, sz = (float(s) for s in main["spacing"])
    # InVesalius stores [slice, row, column]: slice 0 is the lowest and row 0 the most posterior (the
    # head holder's arc is at the top of a raw axial slice, the orbits at the bottom), so +row is +y.
    return Volume("ct-cranium", "CT", np.ascontiguousarray(zyx.transpose(2, 1, 0)), (sx, sy, sz))


def read_nifti(path: str | Path, name: str, modality: str = "MRI") -> Volume:
    """A NIfTI volume reoriented to RAS by its affine (nibabel), as float32."""
    try:
        import nibabel
    except ImportError:
        raise DataError("reading NIfTI volumes needs nibabel: pip install nibabel (it is in medvlm's dev extra).") from None
    try:
        image = nibabel.as_closest_canonical(nibabel.load(str(path)))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, ValueError, nibabel.filebasedimages.ImageFileError) as e:
        raise DataError(f"{path}: cannot read it as NIfTI ({type(e).__name__}).") from None
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, found shape {data.shape}.")
    return Volume(name, modality, data, tuple(float(z) for z in image.header.get_zooms()[:3]))


def cut(volume: Volume, plane: str, index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """One slice as displayed (axial: anterior up; coronal and sagittal: superior up; the patient's
    right on the viewer's left, sagittal anterior on the left) and its pixel size (rows, columns) in mm."""
    d, (sx, sy, sz) = volume.data, volume.spacing
    if plane == "axial":
        img, size = d[:, :, index].T, (sy, sx)
    elif plane == "coronal":
        img, size = d[:, index, :].T, (sz, sx)
    else:
        img, size = d[index, :, :].T, (sz, sy)
    return img[::-1, ::-1], size


def plane_length(volume: Volume, plane: str) -> int:
    return volume.data.shape[{"axial": 2, "coronal": 1, "sagittal": 0}[plane]]


def body_mask(volume: Volume, img: np.ndarray) -> np.ndarray:
    """Pixels inside the body: above -500 HU for CT, above a tenth of the volume's 99th percentile for MRI."""
    return img > (-500 if volume.modality == "CT" else volume.body_threshold)


def anatomy_positions(volume: Volume, plane: str, min_share: float = 0.12) -> list[int]:
    """Slice indices of `plane` whose body covers at least `min_share` of the slice."""
    return [i for i in range(plane_length(volume, plane))
            if body_mask(volume, cut(volume, plane, i)[0]).mean() >= min_share]


def split_positions(positions: list[int], step: int) -> dict[str, list[int]]:
    """Every `step`-th position, assigned by its relative place among `positions`: inside
    HELDOUT_BAND -> "val", within GAP of it -> dropped, else "train"."""
    out = {"train": [], "val": []}
    lo, hi = HELDOUT_BAND
    for k in range(0, len(positions), step):
        where = k / max(1, len(positions) - 1)
        if lo <= where < hi:
            out["val"].append(positions[k])
        elif not (lo - GAP <= where < hi + GAP):
            out["train"].append(positions[k])
    return out


def to_uint8(volume: Volume, img: np.ndarray, window: str | None) -> np.ndarray:
    """CT through a named window; MRI scaled between the volume's 0.5th and 99.5th percentiles."""
    if volume.modality == "CT":
        level, width = CT_WINDOWS[window]
        low, high = level - width / 2, level + width / 2
    else:
        low, high = volume.display
    return (np.clip((img - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def render(volume: Volume, plane: str, index: int, window: str | None) -> Image.Image:
    """The slice as an 8-bit image at its physical aspect ratio, IMAGE_SIDE pixels on its longer side."""
    img, (row_mm, col_mm) = cut(volume, plane, index)
    height, width = img.shape[0] * row_mm, img.shape[1] * col_mm
    scale = IMAGE_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(to_uint8(volume, img, window)).resize(size, Image.BILINEAR)


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """One "acquired differently" variant: a gamma curve, a rotation, a crop, sometimes blur, then noise."""
    gamma = rng.uniform(0.7, 1.4)
    image = image.point(lambda v: round(255 * (v / 255) ** gamma))
    image = image.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    w, h = image.size
    share = rng.uniform(0.8, 1.0)
    cw, ch = round(w * share), round(h * share)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0, 8), (image.size[1], image.size[0]))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def attributes_of(volume: Volume, plane: str, window: str | None) -> dict[str, str]:
    found = {"modality": volume.modality, "organ": "head", "plane": plane}
    return {**found, "window": window} if window else found


def caption(attributes: dict[str, str]) -> str:
    """"a CT scan of the head, axial, bone window." (the VQA-RAD caption form, with plane and window)."""
    parts = [f"{MODALITY_PHRASE[attributes['modality']]} of the {attributes['organ']}", attributes["plane"]]
    if "window" in attributes:
        parts.append(f"{attributes['window']} window")
    return ", ".join(parts) + "."


# The out-of-source validation questions: every option named, so each is a closed question whose
# accuracy is that attribute's accuracy (eval's closed_options reads the options from the text).
VAL_QUESTIONS = {
    "MODALITY": "Is this a CT, an MRI or an x-ray?",
    "ORGAN": "Is this an image of the head, the chest or the abdomen?",
    "PLANE": "Is this an axial, a coronal or a sagittal image?",
    "WINDOW": "Is this CT shown in a brain, a soft tissue or a bone window?",
}
OPEN_VAL_QUESTION = "What imaging modality is this?"


def val_questions(image: str, attributes: dict[str, str]) -> list[dict]:
    """vqa-jsonl records (medvlm eval vqa-jsonl) for one held-out slice."""
    gold = {"MODALITY": attributes["modality"], "ORGAN": attributes["organ"], "PLANE": attributes["plane"],
            "WINDOW": attributes.get("window")}
    stem = Path(image).stem
    records = [{"id": f"{stem}-{kind.lower()}", "image": image, "question": question, "answer": gold[kind],
                "answer_type": "CLOSED", "question_type": kind}
               for kind, question in VAL_QUESTIONS.items() if gold[kind]]
    records.append({"id": f"{stem}-modality-open", "image": image, "question": OPEN_VAL_QUESTION,
                    "answer": attributes["modality"], "answer_type": "OPEN", "question_type": "MODALITY"})
    return records


def write_slice_data(volumes: list[Volume], out: str | Path, step: int = 2, augmentations: int = 1,
                     seed: int = 0, open_questions: bool = True, listed_questions: bool = False,
                     progress: bool = True) -> dict[str, int]:
    """Slices of `volumes` -> OUT/images/*.png and
    - OUT/train.json: one grounding conversation per training image (train/grounding.py's questions,
      with the CT window as a fourth attribute), for `medvlm train instruct-data --slices OUT`;
    - OUT/clip_train.jsonl: a caption per training image, for `medvlm train clip-data --slices OUT`;
    - OUT/val.jsonl: closed questions per held-out image (modality, region, plane, window) and an open
      modality question, for `medvlm eval vqa-jsonl --data OUT --split val`;
    - OUT/contact_sheet.png: the middle slice of every source, plane and window, to check orientation by eye;
    - OUT/manifest.json: what was written.
    Each training position is written `augmentations` times (a CT position in a window drawn per copy),
    each held-out position once per window, unaugmented. Returns the counts."""
    from tqdm import tqdm

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    conversations, captions, questions, counts = [], [], [], {}
    anatomy = {(v.name, plane): anatomy_positions(v, plane) for v in volumes for plane in PLANES}
    jobs = [(v, plane) for v in volumes for plane in PLANES]
    for volume, plane in tqdm(jobs, desc="slicing", unit="plane", disable=not progress):
        windows = list(CT_WINDOWS) if volume.modality == "CT" else [None]
        split = split_positions(anatomy[volume.name, plane], step)
        for index in split["train"]:
            for copy in range(augmentations):
                rng = keyed_rng(f"{seed}:{volume.name}:{plane}:{index}:{copy}")
                window = rng.choice(windows)
                name = f"{volume.name}-{plane}-{index:03d}-{copy}.png"
                augment(render(volume, plane, index, window), rng).save(out / "images" / name)
                attributes = attributes_of(volume, plane, window)
                path = str((out / "images" / name).resolve())
                turns = grounding_turns(attributes, rng, open_questions, listed_questions)
                conversations.append({"id": Path(name).stem + "-grounding", "image": path,
                                      "conversations": question_answer_turns(turns)})
                captions.append(json.dumps({"image": path, "text": caption(attributes)}))
        for index in split["val"]:
            for window in windows:
                suffix = f"-{window.replace(' ', '')}" if window else ""
                name = f"{volume.name}-{plane}-{index:03d}{suffix}.png"
                render(volume, plane, index, window).save(out / "images" / name)
                questions += val_questions(f"images/{name}", attributes_of(volume, plane, window))
        counts[f"{volume.name} {plane}"] = len(split["train"]) * augmentations
        counts[f"{volume.name} {plane} val"] = len(split["val"]) * len(windows)
    contact_sheet(volumes, anatomy).save(out / "contact_sheet.png")
    write_json_list(out / "train.json", conversations)
    write_lines(out / "clip_train.jsonl", captions)
    write_lines(out / "val.jsonl", [json.dumps(q) for q in questions])
    counts.update(train_images=len(conversations), val_questions=len(questions))
    (out / "manifest.json").write_text(json.dumps({"counts": counts, "step": step, "augmentations": augmentations,
                                                   "seed": seed, "heldout_band": HELDOUT_BAND, "gap": GAP}, indent=1))
    return counts


def contact_sheet(volumes: list[Volume], anatomy: dict[tuple[str, str], list[int]] | None = None,
                  side: int = 160) -> Image.Image:
    """One row per volume: its middle slice in each plane (a CT in each window), as written.
    `anatomy`: anatomy_positions per (volume name, plane), when already computed."""
    anatomy = anatomy or {(v.name, plane): anatomy_positions(v, plane) for v in volumes for plane in PLANES}
    rows = [[render(v, plane, anatomy[v.name, plane][len(anatomy[v.name, plane]) // 2], window)
             for plane in PLANES for window in (list(CT_WINDOWS) if v.modality == "CT" else [None])]
            for v in volumes]
    sheet = Image.new("L", (side * max(len(r) for r in rows), side * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            image = image.copy()
            image.thumbnail((side - 4, side - 4))
            sheet.paste(image, (x * side + (side - image.width) // 2, y * side + (side - image.height) // 2))
    return sheet
