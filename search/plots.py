"""The pictures of a search report: FID bar chart with spreads, and a labelled contact sheet."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from search.select import RankRow


def fid_bar_chart(rows: Sequence[RankRow], chosen: Sequence[str], path: str, title: str = "") -> str:
    """Horizontal bars of FID ± spread in rank order: chosen, kept and dropped in three colours."""
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.path.dirname(os.path.abspath(path)), ".mpl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.augmentation for r in rows]
    fids = np.array([r.fid for r in rows])
    stds = np.array([r.fid_std for r in rows])
    colours = ["#1f77b4" if r.augmentation in chosen else "#7fb3d5" if r.kept else "#bbbbbb" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    y = np.arange(len(rows))
    ax.barh(y, fids, xerr=stds, color=colours, ecolor="#333333", capsize=2)
    ax.set_yticks(y, [f"{r.rank}. {n}" + ("" if r.kept else " (dropped)") for r, n in zip(rows, names)], fontsize=8)
    ax.invert_yaxis()
    positive = fids[fids > 0]
    if positive.size and positive.max() / positive.min() > 100:
        ax.set_xscale("log")   # FIDs of a pool span decades: flips near 0, inversions far away
    ax.set_xlabel("FID(augmented copy, originals), mean ± spread over repeats")
    ax.set_title(title or "MineAug stage 1: dark = chosen, light = kept, grey = dropped", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def contact_sheet(originals: torch.Tensor, augmented: Sequence[tuple[str, torch.Tensor]], path: str,
                  cell: int = 72) -> str:
    """One row per entry (originals first), the same images in every row, name on the left.

    `originals`, `augmented[i][1]`: uint8 (n, C, H, W) with C = 1 or 3."""
    rows = [("original", originals)] + list(augmented)
    n = originals.shape[0]
    label_w, pad = 130, 2
    sheet = Image.new("RGB", (label_w + n * (cell + pad) + pad, len(rows) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (name, images) in enumerate(rows):
        top = pad + i * (cell + pad)
        draw.text((4, top + cell // 2 - 6), name, fill=(0, 0, 0))
        for j in range(n):
            a = images[j].permute(1, 2, 0).numpy()
            img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (label_w + pad + j * (cell + pad), top))
    sheet.save(path)
    return path
