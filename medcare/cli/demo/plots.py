"""The demo's plots: loss curves of both stages and the expert load after stage 1 (PNG, matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_summary"]


def _say(message: str) -> None:
    print(f"[medcare demo] {message}", flush=True)


def plot_summary(s: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        _say("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = s["medcare_config"]["orth_lambda"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    h1 = s["stage1"]["history"]
    a1.plot([h["step"] for h in h1], [h["loss"] for h in h1], marker=".", color="tab:blue")
    a1.set_title("stage 1: knowledge aggregation (MoLoRA)")
    a1.set_xlabel("step")
    a1.set_ylabel("training loss (task)")
    a1.grid(alpha=0.3)
    h2 = s["stage2"]["history"]
    steps = [h["step"] for h in h2]
    task = [h["loss"] for h in h2]  # MedCareTrainer logs the task loss as "loss", the penalty beside it
    a2.plot(steps, task, marker=".", color="tab:blue", label="task loss")
    a2.set_title(f"stage 2: alignment (orthogonal LoRA, lambda={lam:g})")
    a2.set_xlabel("step")
    a2.set_ylabel("training loss (task)")
    a2.grid(alpha=0.3)
    b2 = a2.twinx()
    b2.plot(steps, [h.get("orth_penalty", float("nan")) for h in h2], marker=".", color="tab:red",
            label="orthogonal penalty")
    b2.set_yscale("log")
    b2.set_ylabel("orthogonal penalty", color="tab:red")
    lines = a2.get_lines() + b2.get_lines()
    a2.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written = ["loss_curves.png"]

    load = s.get("expert_load")
    if load:
        import numpy as np

        names = [n.replace("model.layers.", "layer ").replace(".mlp.", " ") for n in load]
        data = np.array([v for v in load.values()]) * 100
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * data.shape[1], 0.9 + 0.35 * len(names)))
        im = ax.imshow(data, cmap="viridis", aspect="auto")
        ax.set_xticks(range(data.shape[1]), [f"e{i}" for i in range(data.shape[1])])
        ax.set_yticks(range(len(names)), names)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < data.max() * 0.6 else "black")
        ax.set_title("expert load after stage 1 (% of top-k choices)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append("expert_load.png")
    return written
