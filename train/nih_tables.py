"""`medvlm train nih-tables`: a copy of an NIH folder whose labels.csv also carries the ChestX-ray14 tables
that the torchxrayvision 1.5.7 wheel ships (read straight out of the wheel with zipfile; torchxrayvision
itself is not installed, it pulls in heavy packages).

Added columns (every existing column, split included, is kept as given):
- `findings_v2020`: the image's `Finding Labels` in Data_Entry_2017_v2020.csv.gz (all 112,120 images,
  NLP-mined like ours), '|'-separated as `findings`;
- `expert`: the Google 2019 expert-adjudicated labels (google2019_nih-chest-xray-labels.csv.gz: Fracture,
  Pneumothorax, Airspace opacity, Nodule or mass, each YES/NO) as vlm.datasets.format_expert writes them,
  empty for an image the experts did not read;
- `boxes`: one BBox_List_2017.csv.gz label per bounding box, '|'-separated (ChestX-ray14 spelling:
  the file's "Infiltrate" is written "Infiltration"), empty for an image without boxes.
The tables name PNG files (00005425_000.png) and our images are JPEG (00005425_000.jpg): rows join on the
name without its extension.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from pathlib import Path, PurePath

from train.nih_labels import check_copy_target, write_labels_copy
from vlm.datasets import EXPERT_LABELS, format_expert, read_labels
from vlm.errors import InputError

DATA = "torchxrayvision/data/"
ENTRIES, BOXES, EXPERT = "Data_Entry_2017_v2020.csv.gz", "BBox_List_2017.csv.gz", "google2019_nih-chest-xray-labels.csv.gz"
NEEDED = {ENTRIES: ("Image Index", "Finding Labels"), BOXES: ("Image Index", "Finding Label"),
          EXPERT: ("Image Index", *EXPERT_LABELS)}
ADDED = ("findings_v2020", "expert", "boxes")
GET_WHEEL = "get it with `pip download --no-deps torchxrayvision==1.5.7`"
_BOX_SPELLING = {"Infiltrate": "Infiltration"}


def read_wheel_tables(wheel: Path) -> dict[str, list[dict]]:
    """The rows of the three tables in the torchxrayvision wheel `wheel`, by file name; one-line
    InputErrors for a missing file, a file that is not a zip, or a wheel without the tables."""
    if not wheel.is_file():
        raise InputError(f"no torchxrayvision wheel at {wheel}; {GET_WHEEL}.")
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            missing = [n for n in NEEDED if DATA + n not in names]
            if missing:
                raise InputError(f"{wheel} lacks {', '.join(DATA + n for n in missing)}: not the torchxrayvision "
                                 f"1.5.7 wheel ({GET_WHEEL}).")
            return {n: _table(wheel, n, z.read(DATA + n)) for n in NEEDED}
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{wheel} is not a readable wheel (zip file): {e}; {GET_WHEEL}.") from None


def _table(wheel: Path, name: str, raw: bytes) -> list[dict]:
    try:
        reader = csv.DictReader(io.StringIO(gzip.decompress(raw).decode("utf-8")))
        rows = list(reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{wheel}: {DATA + name} is not a gzipped CSV ({e}).") from None
    absent = [c for c in NEEDED[name] if c not in (reader.fieldnames or [])]
    if absent:
        raise InputError(f"{wheel}: {DATA + name} has no column {', '.join(absent)}.")
    return rows


def _stem(name: str) -> str:
    return PurePath(name.strip()).stem


def join_tables(rows: list[dict], tables: dict[str, list[dict]], where: str) -> list[dict]:
    """`rows` (an NIH labels.csv) with the ADDED columns filled from `tables`; an InputError naming
    the first image that matches no row of Data_Entry_2017_v2020 (which lists every ChestX-ray14 image)."""
    entries = {_stem(r["Image Index"]): r["Finding Labels"] for r in tables[ENTRIES]}
    expert = {}
    for r in tables[EXPERT]:
        bad = [c for c in EXPERT_LABELS if r[c] not in ("YES", "NO")]
        if bad:
            raise InputError(f"{EXPERT}: {r['Image Index']} has {bad[0]}={r[bad[0]]!r}; expected YES or NO.")
        expert[_stem(r["Image Index"])] = format_expert({c: r[c] == "YES" for c in EXPERT_LABELS})
    boxes: dict[str, list[str]] = {}
    for r in tables[BOXES]:
        label = r["Finding Label"].strip()
        boxes.setdefault(_stem(r["Image Index"]), []).append(_BOX_SPELLING.get(label, label))
    unmatched = [r["image"] for r in rows if _stem(r["image"]) not in entries]
    if unmatched:
        raise InputError(f"{where}: {len(unmatched)} of {len(rows)} images match no row of {ENTRIES} "
                         f"(e.g. {unmatched[0]}); is this a ChestX-ray14 folder?")
    return [{**r, "findings_v2020": entries[_stem(r["image"])], "expert": expert.get(_stem(r["image"]), ""),
             "boxes": "|".join(boxes.get(_stem(r["image"]), []))} for r in rows]


def label_set(findings: str) -> frozenset[str]:
    return frozenset(f.strip() for f in findings.split("|") if f.strip())


def write_nih_tables(wheel: Path, source: Path, out: Path) -> dict:
    """A copy of the NIH folder `source` in `out` (labels.csv with the ADDED columns, images/ linked) and
    the counts: images per table, v2020 labels that differ from `findings` (as label sets), per split."""
    labels = source / "labels.csv"
    if not labels.is_file():
        raise InputError(f"no labels.csv in {source} (give the nih_cxr folder, or a `medvlm train nih-split` copy).")
    rows, columns = read_labels(labels)
    if not {"image", "findings"} <= set(columns):
        raise InputError(f"{labels}: needs columns image and findings.")
    check_copy_target(source, out)
    tables = read_wheel_tables(wheel)
    joined = join_tables(rows, tables, str(labels))
    write_labels_copy(source, out, joined, columns + [c for c in ADDED if c not in columns])
    splits = sorted({r.get("split", "") for r in joined})
    return {"images": len(joined), "rows": {n: len(t) for n, t in tables.items()},
            "v2020": len(joined), "v2020_differ": sum(label_set(r["findings"]) != label_set(r["findings_v2020"])
                                                      for r in joined),
            "expert": {s: sum(bool(r["expert"]) for r in joined if r.get("split", "") == s) for s in splits},
            "boxes_images": sum(bool(r["boxes"]) for r in joined),
            "boxes": sum(len(r["boxes"].split("|")) for r in joined if r["boxes"])}


def describe_counts(counts: dict, out: Path) -> str:
    expert = counts["expert"]
    by_split = ", ".join(f"{s or '(no split)'} {n}" for s, n in expert.items())
    return (f"{counts['images']} images -> {out}\n"
            f"{ENTRIES} ({counts['rows'][ENTRIES]} rows): covers {counts['v2020']}; labels differ from `findings` "
            f"for {counts['v2020_differ']}\n"
            f"{EXPERT} ({counts['rows'][EXPERT]} rows): covers {sum(expert.values())} ({by_split})\n"
            f"{BOXES} ({counts['rows'][BOXES]} boxes): covers {counts['boxes_images']} images, {counts['boxes']} boxes")


def add_nih_tables_command(stages) -> None:
    """`medvlm train nih-tables` under the `train` sub-commands `stages`."""
    p = stages.add_parser("nih-tables", help="copy the NIH labels with the ChestX-ray14 tables of the torchxrayvision "
                                             "wheel joined in (v2020 labels, Google expert labels, boxes)")
    p.add_argument("--wheel", required=True, help="torchxrayvision-1.5.7-py3-none-any.whl "
                                                  "(`pip download --no-deps torchxrayvision==1.5.7`)")
    p.add_argument("--nih", required=True, help="the nih_cxr folder, or a `train nih-split` copy (labels.csv, images/)")
    p.add_argument("--out", required=True, help="a new folder: labels.csv and a link to the images")
    p.set_defaults(run=run_nih_tables)


def run_nih_tables(args) -> int:
    out = Path(args.out)
    print(describe_counts(write_nih_tables(Path(args.wheel), Path(args.nih), out), out))
    return 0
