#!/usr/bin/python3
"""A BirdCLEF-scale pool made cheaply from small synthetic corpora (`aviary synth`).

Each output source gets the real pool's row count (times --scale): 2021 62,900, 2022 14,900,
2023 16,900, xc 45,000 and the 2024 target 24,459. Rows are drawn per class from a Zipf-like
long tail over the template corpus's species (a few head classes with thousands of rows, many
with a handful); each new row copies a template row of its class, gets a new XC id and file
name, and its audio is a hard link to the template's file, so every path exists and decodes
while the disk holds only the templates. About 10% of the rows take ids shared across sources
(same id, label and author), so the pool's dedup and the target exclusion have real work.

usage: make_corpus.py --templates DIR --out DIR [--scale F] [--seed S]
  DIR/<layout> for layout in 2024 2023 2022 2021 xc, each written by `aviary synth`
"""
import argparse
import csv
import os
import random
import sys

SIZES = {"2024": 24459, "2023": 16900, "2022": 14900, "2021": 62900, "xc": 45000}
METADATA = {"2024": "train_metadata.csv", "2023": "train_metadata.csv", "2022": "train_metadata.csv",
            "2021": "train_metadata.csv", "xc": "train_extended.csv"}
LABEL = {"xc": "ebird_code"}
EXT = {"xc": ".mp3"}


def audio_rel(layout, label, filename):
    """The layout's path rule (common/layouts.h, RelativeAudioPath)."""
    if layout in ("2024", "2023", "2022"):
        return f"train_audio/{filename}"
    if layout == "2021":
        return f"train_short_audio/{label}/{filename}"
    half = "A-M" if label[0].lower() <= "m" else "N-Z"
    return f"{half}/{label}/{filename}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--templates", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    rng = random.Random(a.seed)
    for index, (layout, size) in enumerate(SIZES.items()):
        src = os.path.join(a.templates, layout)
        with open(os.path.join(src, METADATA[layout]), newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            rows = list(reader)
        label_col = LABEL.get(layout, "primary_label")
        by_label = {}
        for r in rows:
            by_label.setdefault(r[label_col], []).append(r)
        labels = sorted(by_label)
        # A shared id's number comes from the label's place in name order, the same in every
        # source (the drawing order below is shuffled per source): the same id then carries the
        # same label (and author) wherever it appears, as a cross-source duplicate does.
        place = {label: k for k, label in enumerate(labels)}
        rng.shuffle(labels)
        weights = [1.0 / (k + 1) ** 1.1 for k in range(len(labels))]
        n = max(len(labels), int(round(size * a.scale)))
        drawn = labels + rng.choices(labels, weights=weights, k=n - len(labels))  # every class once
        out = os.path.join(a.out, layout)
        os.makedirs(out, exist_ok=True)
        made_dirs = set()
        with open(os.path.join(out, METADATA[layout]), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for i, label in enumerate(drawn):
                template = by_label[label][i % len(by_label[label])]
                row = dict(template)
                if rng.random() < 0.1:  # an id shared with the other sources
                    number = 10_000_000 + place[label] * 1000 + rng.randrange(200)
                    row["author"] = f"Recordist {number % 997}"
                else:
                    number = 20_000_000 + index * 1_000_000 + i
                xc = f"XC{number}"
                ext = EXT.get(layout, ".ogg")
                row["filename"] = f"{label}/{xc}{ext}" if layout in ("2024", "2023", "2022") else f"{xc}{ext}"
                if "xc_id" in row:
                    row["xc_id"] = xc
                writer.writerow(row)
                target = os.path.join(out, audio_rel(layout, label, row["filename"]))
                folder = os.path.dirname(target)
                if folder not in made_dirs:
                    os.makedirs(folder, exist_ok=True)
                    made_dirs.add(folder)
                if not os.path.exists(target):  # shared ids repeat within a source
                    os.link(os.path.join(src, audio_rel(layout, label, template["filename"])), target)
        print(f"{layout}: {n} rows, {len(labels)} classes -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
