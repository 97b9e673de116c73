"""Figures (matplotlib, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from clipguard.outputs import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path) -> None:
    path = Path(path)
    try:  # matplotlib reads the format from the temporary name's suffix
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, bbox_inches="tight"), f".{path.stem}.tmp{path.suffix}")
    finally:
        plt.close(fig)


def example_index(images, target: int, seed: int) -> int:
    """A seeded image of a non-target class from ``images`` (an ImageSet): the trigger grid's example."""
    others = torch.nonzero(images.labels != target).flatten()
    return int(others[torch.randint(len(others), (1,), generator=torch.Generator().manual_seed(seed))])


DIFF_LABEL = "|triggered - clean| / panel max"


def plot_trigger_grid(image: torch.Tensor, triggers: list, path: str | Path):
    """Row 1: the clean image and each triggered version; row 2: the amplified difference.

    The difference (mean over channels) is scaled to each panel's own maximum, written above the
    panel, so faint triggers show; one colour bar gives that scale. Returns the (closed) figure."""
    image = image.reshape(1, 3, *image.shape[-2:])
    fig, axes = plt.subplots(2, len(triggers) + 1, figsize=(1.6 * (len(triggers) + 1) + 0.6, 3.4), squeeze=False)
    axes[0, 0].imshow(image[0].permute(1, 2, 0).numpy())
    axes[0, 0].set_title("clean", fontsize=8)
    axes[1, 0].axis("off")
    shown = None
    for col, trigger in enumerate(triggers, start=1):
        triggered = trigger(image.clone())
        axes[0, col].imshow(triggered[0].permute(1, 2, 0).numpy())
        axes[0, col].set_title(trigger.name + (f"\n+ '{trigger.text_key.strip()}'" if trigger.text_key else ""), fontsize=8)
        diff = (triggered - image).abs()[0].mean(0)
        shown = axes[1, col].imshow((diff / diff.max().clamp(min=1e-8)).numpy(), cmap="magma", vmin=0, vmax=1)
        axes[1, col].set_title(f"max |diff| {diff.max():.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if shown is not None:
        axes[1, 0].text(0.5, 0.5, "difference\n|triggered - clean|\n(mean over RGB,\nscaled to each\npanel's max)",
                        ha="center", va="center", fontsize=6, transform=axes[1, 0].transAxes)
        bar = fig.colorbar(shown, cax=axes[1, -1].inset_axes([1.06, 0.0, 0.07, 1.0]))  # beside, not shrinking, the row
        bar.set_label(DIFF_LABEL, fontsize=6)
        bar.ax.tick_params(labelsize=6)
    save_figure(fig, path)
    return fig
