"""The training curve (Recall@K and loss against wall time) as PNG bytes, saved beside the manifest."""

from __future__ import annotations

import io


def curve_png(history: list[dict], k: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    stepped = [h for h in history if h.get("loss") is not None]  # an epoch without steps has no loss
    ax.plot([h["seconds"] for h in stepped], [h["loss"] for h in stepped], color="tab:red", marker=".", label="loss")
    ax.set_xlabel("seconds of training")
    ax.set_ylabel("BPR loss", color="tab:red")
    evaluated = [h for h in history if f"recall@{k}" in h]
    if evaluated:
        ax2 = ax.twinx()
        ax2.plot([h["seconds"] for h in evaluated], [h[f"recall@{k}"] for h in evaluated], color="tab:blue",
                 marker="o", label=f"recall@{k}")
        ax2.set_ylabel(f"Recall@{k}", color="tab:blue")
    ax.set_title("training curve")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
