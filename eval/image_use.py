"""Does a model use its image? Two checks behind the diagnosis in the demo model card.

    medvlm eval image-use loss-gap --model demo --data data/demo/train.json --n 40
    medvlm eval image-use probe --model demo --vqa-rad ../shared/data/vqa_rad
    medvlm eval image-use nih-probe --model demo --nih ../shared/data/nih_cxr

loss-gap: the answer loss on conversations with their real image and with a black one; a model
that ignores the image scores the same twice. probe: can the frozen image tower's mean-pooled
tokens tell VQA-RAD images' organ and modality apart? (5-fold nearest-class-mean on standardized
features; if yes, a model that still gets "is this a CT?" wrong loses the fact after the tower.)
nih-probe: one logistic regression per CheXpert observation on the same pooled tokens of the NIH
train split, scored on val and test the way drafted reports are: an observation where its
probability passes 0.5 (what a decoder that takes each finding's likelier side would write),
"No Finding" where none does. If it beats the "No Finding" baseline and the reports do not, the
tower sees enough and the report's wording or decoding loses it.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from eval.labeler import OBSERVATIONS, clinical_efficacy, nih_to_chexpert
from eval.score import majority_report_baseline
from train.captions import organs_and_modality_votes, top_vote
from train.clip import auroc
from train.data import load_conversations
from train.vlm_stage import collate_conversations
from vlm.datasets import label_rows, vqa_rad_records
from vlm.imaging import load_image


@torch.no_grad()
def loss_gap(model, data: str | Path, n: int, batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """Mean answer loss over `n` seeded-random conversations of `data`, with the image and black."""
    records = load_conversations(data)
    random.Random(seed).shuffle(records)
    records = records[:n]
    losses = {"real": [], "black": []}
    for start in range(0, len(records), batch_size):
        batch = collate_conversations(model, records[start: start + batch_size])
        black = model.vision.preprocess([Image.new("RGB", (256, 256))] * batch["pixel_values"].shape[0])
        for kind, pixels in (("real", batch["pixel_values"]), ("black", black)):
            out = model(batch["input_ids"], batch["attention_mask"], pixels, labels=batch["labels"])
            losses[kind].append(float(out.loss))
    return {kind: sum(v) / len(v) for kind, v in losses.items()}


def nearest_mean_accuracy(features: torch.Tensor, labels: list[str], folds: int = 5, seed: int = 0) -> float:
    """k-fold accuracy of a nearest-class-mean classifier on z-scored features."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        if len(test) == 0:
            continue
        train = order[torch.arange(len(order)) % folds != fold]
        mean, std = features[train].mean(0), features[train].std(0, unbiased=False) + 1e-6
        z = (features - mean) / std
        classes = sorted({labels[i] for i in train.tolist()})
        centroids = torch.stack([z[[i for i in train.tolist() if labels[i] == c]].mean(0) for c in classes])
        guess = torch.cdist(z[test], centroids).argmin(1)
        correct += sum(classes[g] == labels[i] for g, i in zip(guess.tolist(), test.tolist()))
    return correct / len(labels)


@torch.no_grad()
def pooled_features(model, paths: list[Path], batch_size: int = 32) -> torch.Tensor:
    """The image tower's tokens of each image, mean-pooled: one row per path."""
    return torch.cat([model.vision(model.vision.preprocess([load_image(p).to_pil() for p in paths[i: i + batch_size]])).mean(1)
                      for i in range(0, len(paths), batch_size)])


@torch.no_grad()
def tower_probe(model, vqa_rad: str | Path) -> dict[str, dict]:
    """Organ (all images) and modality (images whose questions vote one) from the tower's tokens."""
    vqa_rad = Path(vqa_rad)
    qas = vqa_rad_records(vqa_rad / "trainset.json") + vqa_rad_records(vqa_rad / "testset.json")
    organs, votes = organs_and_modality_votes(qas)
    names = sorted(organs)
    features = pooled_features(model, [vqa_rad / "images" / n for n in names])
    modality = {n: top_vote(v) for n, v in votes.items() if v}
    report = {}
    for task, label_of in (("organ", organs), ("modality", modality)):
        keep = [i for i, n in enumerate(names) if n in label_of]
        labels = [label_of[names[i]] for i in keep]
        report[task] = {"images": len(keep), "accuracy": nearest_mean_accuracy(features[keep], labels),
                        "majority": Counter(labels).most_common(1)[0][1] / len(labels),
                        "classes": dict(Counter(labels))}
    return report


def logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float = 0.02, steps: int = 200) -> torch.Tensor:
    """Weights (bias last) of an L2-penalized logistic regression fit by L-BFGS."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * w[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return w.detach()


def nih_probe(model, nih: str | Path, threshold: float = 0.5, min_positives: int = 5) -> dict:
    """Per-observation logistic probes on the tower's pooled tokens (NIH train), scored on val and
    test as reports are scored (eval.labeler.clinical_efficacy), beside the harness's majority-class
    baseline (for NIH, every report "No Finding")."""
    splits = {s: label_rows(Path(nih) / "labels.csv", s) for s in ("train", "val", "test")}
    gold = {s: [nih_to_chexpert(findings) for _, findings in rows] for s, rows in splits.items()}
    features = {s: pooled_features(model, [image for image, _ in rows]) for s, rows in splits.items()}
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    features = {s: (f - mean) / std for s, f in features.items()}
    observed = [o for o in OBSERVATIONS if o != "No Finding" and any(g.get(o) is not None for g in gold["train"])]
    probabilities, report = {s: {} for s in splits}, {"threshold": threshold, "auroc": {}}
    for obs in observed:
        y = torch.tensor([float(g.get(obs) == 1) for g in gold["train"]])
        if y.sum() < min_positives:
            continue
        w = logistic_regression(features["train"], y)
        for s in splits:
            probabilities[s][obs] = torch.sigmoid(features[s] @ w[:-1] + w[-1])
        report["auroc"][obs] = {s: auroc(probabilities[s][obs].tolist(), [g.get(obs) == 1 for g in gold[s]])
                                for s in ("val", "test")}
    scored = observed + ["No Finding"]
    for s in ("val", "test"):
        predicted = []
        for i in range(len(gold[s])):
            present = {o for o, p in probabilities[s].items() if p[i] > threshold}
            predicted.append({o: int(o in present) for o in observed} | {"No Finding": int(not present)})
        baseline = majority_report_baseline(gold[s], scored)  # the floor `medvlm eval` puts beside reports
        report[s] = {"images": len(gold[s]), "with_a_finding": sum(p["No Finding"] == 0 for p in predicted),
                     "probe_micro_f1": clinical_efficacy(predicted, gold[s], scored, uncertain_as_positive=False)["micro_f1"],
                     "majority_baseline": baseline["majority_class"],
                     "majority_baseline_micro_f1": baseline["ce_micro_f1"]}
    return report
