"""`medvlm train {clip,align,instruct} --config PRESET_OR_YAML [overrides]`, and
`medvlm train instruct --model hf:ORG/NAME|FOLDER [--config RECIPE] [overrides]` for transformers models.

A config file (or a recipe in train/configs) names its model with `model_preset:` (a model preset
in vlm/presets) and/or gives a `model:` section (MedVLMConfig fields, over the preset's), and has one
section per stage, each with `stage:` (the stage's dataclass) and `train:` (TrainConfig) fields and,
for align and instruct, an optional `model:` section of MedVLMConfig fields for that stage alone.
Every field can be overridden on the command line; the options are derived from the dataclasses
(model fields with a prefix: `--model.language.lora-r 16`, `--model.vision.trainable`).

`--model` naming a transformers image-text-to-text model (vlm.sources.model_kind), or a recipe whose
instruct stage names one (`instruct: {stage: {model: hf:...}}`, e.g. medgemma-4b-qlora), trains that model
with LoRA/QLoRA instead (train/hf_instruct.py): its stage fields are HFInstructConfig's, and the
medvlm-only options (--init, --model.*) do not apply. `medvlm export --merge` is added here too
(train/export.py).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from train.export import add_export_command
from train.hf_instruct import HFInstructConfig
from train.loop import TrainConfig, train
from train.nih_tables import add_nih_tables_command
from vlm.config import MedVLMConfig, from_dict
from vlm.errors import ConfigError
from vlm.options import add_nested_options, add_options, collect, collect_nested, simple_fields
from vlm.presets import merge_model_fields, model_preset_data

STAGES = ("clip", "align", "instruct")


def stage_config_class(name: str) -> type:
    if name == "clip":
        from train.clip import ClipStageConfig

        return ClipStageConfig
    from train.vlm_stage import VLMStageConfig

    return VLMStageConfig


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a stage: clip, align or instruct")
    stages = p.add_subparsers(title="stages", metavar="STAGE")
    helps = {"clip": "contrastive image-text pretraining of the image tower",
             "align": "projector alignment on image-caption pairs",
             "instruct": "projector + LoRA instruction tuning on conversations"}
    for name in STAGES:
        s = stages.add_parser(name, help=helps[name])
        s.add_argument("--config", required=name != "instruct", help="a recipe name (train/configs) or a YAML file"
                       + (" (optional with --model)" if name == "instruct" else ""))
        s.add_argument("--no-resume", action="store_true", help="start over even if OUT has checkpoints")
        add_options(s, TrainConfig, simple_fields(TrainConfig))
        add_options(s, stage_config_class(name), simple_fields(stage_config_class(name)))
        if name != "clip":  # clip trains its own tower (its stage's `vision`), not a MedVLM
            add_nested_options(s, MedVLMConfig, "model")
        if name == "instruct":
            add_options(s.add_argument_group("transformers models (--model hf:ORG/NAME or a folder)"),
                        HFInstructConfig, hf_only_fields())
        s.set_defaults(run=run_train, stage=name)
    data = stages.add_parser("clip-data", help="write caption pairs for `train clip` from NIH and VQA-RAD")
    data.add_argument("--nih", required=True, help="the nih_cxr folder (labels.csv, images/)")
    data.add_argument("--vqa-rad", required=True, help="the vqa_rad folder (trainset.json, images/)")
    data.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    data.add_argument("--slices", help="a folder from `train slice-data`: its training slices' captions join train.jsonl")
    data.set_defaults(run=run_clip_data)
    slices = stages.add_parser("slice-data", help="cut real public volumes (a head CT, a T1 head MRI) into labelled "
                                                  "slices in three planes, with a held-out band for validation")
    slices.add_argument("--invesalius", action="append", default=[], metavar="INV3",
                        help="an InVesalius project, e.g. Debian invesalius-examples' Cranium.inv3 (repeatable)")
    slices.add_argument("--nifti", action="append", default=[], metavar="FILE",
                        help="a NIfTI T1 head MRI, e.g. Debian mricron-data's ch2.nii.gz (repeatable)")
    slices.add_argument("--out", required=True, help="folder for images/, train.json, clip_train.jsonl, val.jsonl")
    slices.add_argument("--step", type=int, default=2, help="use every STEP-th slice position (default 2)")
    slices.add_argument("--augmentations", type=int, default=1,
                        help="augmented copies of each training position (default 1); held-out slices are not augmented")
    slices.add_argument("--seed", type=int, default=0, help="the augmentations' and questions' seed (default 0)")
    slices.add_argument("--listed-questions", action="store_true",
                        help="add a question naming every option of each attribute (\"Is this a CT, an MRI or an "
                             "x-ray?\", options shuffled), the form the held-out questions take; off by default")
    slices.set_defaults(run=run_slice_data)
    add_export_command(sub)
    carve = stages.add_parser("nih-split", help="copy the NIH labels with some train patients moved to val "
                                                "(a wider val split for choosing runs)")
    carve.add_argument("--nih", required=True, help="the nih_cxr folder (labels.csv, images/)")
    carve.add_argument("--carve-val", type=int, required=True, help="how many train patients move to val")
    carve.add_argument("--seed", type=int, default=0, help="which patients are drawn (default 0)")
    carve.add_argument("--out", required=True, help="a new folder: labels.csv and a link to the images")
    carve.set_defaults(run=run_nih_split)
    add_nih_tables_command(stages)
    vqa = stages.add_parser("vqa-rad-data", help="write VQA-RAD conversations for `train instruct`")
    vqa.add_argument("--vqa-rad", required=True, help="the vqa_rad folder (trainset.json, images/)")
    vqa.add_argument("--out", required=True, help="folder for train.json (train images) and val.json (val images)")
    vqa.set_defaults(run=run_vqa_rad_data)
    both = stages.add_parser("instruct-data", help="write the demo's instruct set: VQA-RAD conversations + NIH "
                                                   "report-drafting conversations")
    both.add_argument("--nih", required=True, help="the nih_cxr folder (labels.csv, images/)")
    both.add_argument("--vqa-rad", required=True, help="the vqa_rad folder (trainset.json, images/)")
    both.add_argument("--out", required=True, help="folder for train.json and val.json (and the parts of each)")
    both.add_argument("--vqa-rad-repeats", type=int, default=1,
                      help="copies of each VQA-RAD train conversation in train.json (default 1): weights the mix "
                           "toward question answering without more steps; val is never repeated")
    both.add_argument("--nih-repeats", type=int, default=1,
                      help="report conversations per NIH train image (default 1); each copy draws its sentences "
                           "afresh (another seed), so the mix leans toward report drafting with varied wording of "
                           "the same findings; val is never repeated")
    both.add_argument("--grounding-repeats", type=int, default=0,
                      help="image-grounding conversations per VQA-RAD train image (default 0): balanced yes/no and "
                           "either-or questions on its modality, organ and plane (train/grounding.py); train only")
    both.add_argument("--grounding-open", action="store_true",
                      help="add an open question per attribute to each grounding conversation (\"What imaging "
                           "modality is this?\" -> CT); off by default, as in the shipped model's recipe")
    both.add_argument("--grounding-listed", action="store_true",
                      help="add a question naming every option of each attribute (\"Is this a CT, an MRI or an "
                           "x-ray?\") to each grounding conversation; off by default")
    both.add_argument("--slices", help="a folder from `train slice-data`: its grounding conversations join train.json")
    both.add_argument("--slice-repeats", type=int, default=1,
                      help="copies of each slice grounding conversation in train.json (default 1)")
    both.add_argument("--bare-question-share", type=float, default=0.0,
                      help="share of the train VQA-RAD and grounding questions written without the \"Answer "
                           "briefly.\" suffix, as chat users type them (default 0, as for the shipped model)")
    both.set_defaults(run=run_instruct_data)


def run_vqa_rad_data(args) -> int:
    from train.captions import write_vqa_rad_conversations

    trainset, out = Path(args.vqa_rad) / "trainset.json", Path(args.out)
    n_train = write_vqa_rad_conversations(trainset, out / "train.json", buckets=("train",))
    n_val = write_vqa_rad_conversations(trainset, out / "val.json", buckets=("val",))
    print(f"conversations: train {n_train}, val {n_val} -> {out}")
    return 0


def run_instruct_data(args) -> int:
    """VQA-RAD train/val buckets and NIH train/val splits, each written alone and combined."""
    from train.captions import drop_brief_suffix, vqa_rad_conversations, write_json_list
    from train.grounding import grounding_conversations
    from train.reports import nih_report_conversations

    if args.vqa_rad_repeats < 1:
        raise ConfigError(f"--vqa-rad-repeats must be at least 1, got {args.vqa_rad_repeats}.")
    if args.nih_repeats < 1:
        raise ConfigError(f"--nih-repeats must be at least 1, got {args.nih_repeats}.")
    if not 0.0 <= args.bare_question_share <= 1.0:
        raise ConfigError(f"--bare-question-share must be between 0 and 1, got {args.bare_question_share}.")
    if args.grounding_repeats < 0:
        raise ConfigError(f"--grounding-repeats must be 0 or more, got {args.grounding_repeats}.")
    if args.slice_repeats < 1:
        raise ConfigError(f"--slice-repeats must be at least 1, got {args.slice_repeats}.")
    out, trainset, labels = Path(args.out), Path(args.vqa_rad) / "trainset.json", Path(args.nih) / "labels.csv"
    slice_grounding = read_slice_conversations(Path(args.slices)) if args.slices else []
    for split in ("train", "val"):
        vqa = vqa_rad_conversations(trainset, buckets=(split,))
        nih = nih_report_conversations(labels, split)
        write_json_list(out / f"vqa_rad_{split}.json", vqa)
        write_json_list(out / f"nih_reports_{split}.json", nih)
        repeats = args.vqa_rad_repeats if split == "train" else 1
        nih_repeats = args.nih_repeats if split == "train" else 1
        grounding = grounding_conversations(trainset, buckets=(split,), repeats=args.grounding_repeats,
                                            open_questions=args.grounding_open,
                                            listed_questions=args.grounding_listed) \
            if split == "train" else []
        slices = _numbered_copies([slice_grounding] * args.slice_repeats) if split == "train" else []
        questions = _numbered_copies([vqa] * repeats) + grounding + slices
        if split == "train" and args.bare_question_share:
            questions = drop_brief_suffix(questions, args.bare_question_share)
        # report copy k draws its sentences with seed k: the same findings, worded afresh
        reports = _numbered_copies([nih] + [nih_report_conversations(labels, split, seed=k)
                                            for k in range(1, nih_repeats)])
        write_json_list(out / f"{split}.json", questions + reports)
        print(f"{split}: {len(vqa)} VQA-RAD (x{repeats}) + {len(grounding)} grounding + {len(slices)} slice grounding "
              f"+ {len(nih)} NIH report "
              f"(x{nih_repeats}) conversations -> {out / f'{split}.json'}")
    return 0


def _numbered_copies(versions: list[list[dict]]) -> list[dict]:
    """The records of each version in turn; the first keeps its ids, version k's get "-copyk", so every
    id in the mix stays distinct (and keys the RNG of drop_brief_suffix)."""
    return [dict(c, id=f"{c['id']}-copy{k}") if k else c for k, version in enumerate(versions) for c in version]


def run_nih_split(args) -> int:
    from train.nih_labels import write_carved_split

    counts = write_carved_split(Path(args.nih), Path(args.out), args.carve_val, args.seed)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


def read_slice_conversations(folder: Path) -> list[dict]:
    """The grounding conversations of a `train slice-data` folder (its train.json)."""
    import json

    path = folder / "train.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--slices {folder}: no readable train.json from `medvlm train slice-data` "
                          f"({type(e).__name__}).") from None


def run_slice_data(args) -> int:
    from train.volumes import read_invesalius, read_nifti, write_slice_data

    if not args.invesalius and not args.nifti:
        raise ConfigError("give at least one volume: --invesalius Cranium.inv3 and/or --nifti ch2.nii.gz.")
    if args.step < 1 or args.augmentations < 1:
        raise ConfigError("--step and --augmentations must be at least 1.")
    volumes = [read_invesalius(p) for p in args.invesalius]
    volumes += [read_nifti(p, name=f"mri-{Path(p).name.split('.')[0]}") for p in args.nifti]
    names = [v.name for v in volumes]
    if len(set(names)) != len(names):
        raise ConfigError(f"two volumes would share a name ({', '.join(names)}); give each file once.")
    counts = write_slice_data(volumes, args.out, step=args.step, augmentations=args.augmentations, seed=args.seed,
                              listed_questions=args.listed_questions)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


def run_clip_data(args) -> int:
    from train.captions import write_clip_data

    counts = write_clip_data(args.nih, args.vqa_rad, args.out, slices=args.slices)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


def load_config_file(reference: str) -> dict:
    """The config mapping of a YAML file, or of the recipe of that name in train/configs, with its
    `model_preset:` resolved into the `model:` section."""
    import yaml

    path = Path(reference)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    else:
        recipes = resources.files("train") / "configs"
        path = recipes / f"{reference}.yaml"
        if not path.is_file():
            known = sorted(p.name[:-5] for p in recipes.iterdir() if p.name.endswith(".yaml"))
            raise ConfigError(f"no preset {reference!r}; known presets: {', '.join(known)}.")
        data = yaml.safe_load(path.read_text())
    return with_model_preset(data or {}, where=str(reference))


def with_model_preset(data: dict, where: str = "config") -> dict:
    """`data` with `model_preset: NAME` replaced by a `model:` section: the preset's fields, with
    those the config's own `model:` section gives over them. A config without one is unchanged."""
    if not isinstance(data, dict) or "model_preset" not in data:
        return data
    name = data["model_preset"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}: model_preset must be a preset name, got {name!r}.")
    rest = {k: v for k, v in data.items() if k != "model_preset"}
    return {**rest, "model": model_preset_data(name, data.get("model") or {})}


def build_stage(name: str, data: dict, overrides_train: dict, overrides_stage: dict,
                overrides_model: dict | None = None):
    """The stage object and TrainConfig for `name`, from a config mapping plus overrides
    (`overrides_model`: MedVLMConfig fields as a nested dict, e.g. {"language": {"lora_r": 16}})."""
    section = data.get(name) or {}
    train_cfg = from_dict(TrainConfig, {**section.get("train", {}), **overrides_train}, where=f"{name}.train")
    stage_cls = stage_config_class(name)
    stage_cfg = from_dict(stage_cls, {**section.get("stage", {}), **overrides_stage}, where=f"{name}.stage")
    if name == "clip":
        if section.get("model") or overrides_model:
            raise ConfigError("clip trains an image tower, not a MedVLM: give its tower under clip.stage.vision, "
                              "not model fields.")
        from train.clip import ClipStage

        return ClipStage(stage_cfg, seed=train_cfg.seed, skip_bad=train_cfg.skip_bad), train_cfg
    changes = merge_model_fields(section.get("model") or {}, overrides_model or {}, where=f"{name}.model")
    model_cfg = from_dict(MedVLMConfig, merge_model_fields(data.get("model") or {}, changes), where="model")
    from train.align import AlignStage
    from train.instruct import InstructStage

    cls = AlignStage if name == "align" else InstructStage
    return cls(stage_cfg, model_cfg, train_cfg.batch_size, train_cfg.skip_bad, model_changes=changes), train_cfg


def hf_only_fields() -> list[str]:
    """HFInstructConfig's command-line fields that the medvlm instruct stage does not share."""
    from train.vlm_stage import VLMStageConfig

    return [f for f in simple_fields(HFInstructConfig) if f not in simple_fields(VLMStageConfig)]


def transformers_base(data: dict, given: str | None) -> str | None:
    """The transformers model an instruct run trains (--model, else the recipe's instruct.stage.model), or None."""
    from vlm.sources import model_kind

    model = given or ((data.get("instruct") or {}).get("stage") or {}).get("model")
    if model and model_kind(model) != "transformers":
        raise ConfigError(f"--model {model}: not a transformers model (hf:ORG/NAME, or a folder with config.json and "
                          "a processor); a medvlm checkpoint is trained with --config RECIPE --init FOLDER.")
    return model or None


def build_hf_stage(data: dict, overrides_train: dict, overrides_stage: dict):
    """The transformers instruct stage and its TrainConfig, from a recipe mapping plus overrides."""
    from train.hf_instruct import HFInstructStage

    if data.get("model"):
        raise ConfigError("a transformers recipe names its base in instruct.stage.model, not in model: or model_preset:.")
    section = data.get("instruct") or {}
    train_cfg = from_dict(TrainConfig, {**section.get("train", {}), **overrides_train}, where="instruct.train")
    stage_cfg = from_dict(HFInstructConfig, {**section.get("stage", {}), **overrides_stage}, where="instruct.stage")
    return HFInstructStage(stage_cfg, train_cfg.batch_size, train_cfg.skip_bad, train_cfg.device), train_cfg


def _stage_from_args(args):
    """(stage, TrainConfig) for the command line: a transformers model's instruct stage, or a medvlm stage."""
    from train.vlm_stage import VLMStageConfig

    data = load_config_file(args.config) if args.config else {}
    train_overrides = collect(args, TrainConfig, simple_fields(TrainConfig))
    hf_given = collect(args, HFInstructConfig, hf_only_fields()) if args.stage == "instruct" else {}
    if args.stage == "instruct" and transformers_base(data, hf_given.get("model")):
        medvlm_only = {**collect(args, VLMStageConfig, ["init", "vision_from", "caption_prompt"]),
                       **collect_nested(args, MedVLMConfig, "model")}
        if medvlm_only:
            raise ConfigError(f"{', '.join(sorted(medvlm_only))}: options of medvlm models, not of a transformers "
                              "--model (use --quantization, --lora-r, --vision ...).")
        return build_hf_stage(data, train_overrides, collect(args, HFInstructConfig, simple_fields(HFInstructConfig)))
    if hf_given:
        flags = ", ".join("--" + f.replace("_", "-") for f in sorted(hf_given))
        raise ConfigError(f"{flags}: options of a transformers --model (hf:ORG/NAME or a folder), not of medvlm stages.")
    if not args.config:
        raise ConfigError("give --config PRESET_OR_YAML (or --model hf:ORG/NAME to train a transformers model).")
    stage_cls = stage_config_class(args.stage)
    model = collect_nested(args, MedVLMConfig, "model") if args.stage != "clip" else {}
    return build_stage(args.stage, data, train_overrides, collect(args, stage_cls, simple_fields(stage_cls)), model)


def run_train(args) -> int:
    stage, cfg = _stage_from_args(args)
    final = train(stage, cfg, resume=not args.no_resume)
    print(f"trained {args.stage}: model in {final}; metrics in {Path(cfg.out) / 'metrics.csv'}, plot {Path(cfg.out) / 'loss.png'}")
    return 0
