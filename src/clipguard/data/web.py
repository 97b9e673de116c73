"""The built-in "web" caption corpus (``--captions fmnist-web``) and the validation split (``--dataset fmnist-val``).

The papers' attacker poisons web pairs (CC3M) and the model is evaluated zero-shot on another
domain (ImageNet). ``fmnist-web`` gives the built-in benchmark that gap: every pair is a
Fashion-MNIST train item rendered as a web photo would show it, and its caption describes the
rendering, while evaluation uses the plain grey test images.

- **Rendering** of pair i, drawn from a generator seeded by i alone (the corpus is a fixed set
  of 55,000 pairs, made on the fly and never stored): the item is tinted with one of 8 colours,
  scaled to 60-100 % and placed at a random spot on a background of one of 6 colours. A third of
  the pairs get a second, smaller item of another class in a corner.
- **Captions** name the colour, the class and the background, and the second item when there
  is one: "a red bag on a grey background", "a photo of a blue coat and a small sandal".
- **Plain pairs** (``fmnist-web:plain=P``): a share P of the pairs, drawn per position from a
  generator of their own (so the others render as with P = 0), shows the plain grey item with
  a plain caption ("a photo of a bag"), as a web corpus holds some photos like the evaluation's.
- **Images**: the first 55,000 train images. ``fmnist-val`` evaluates on the last 5,000, so no
  validation image is in the corpus; its shots come from the first 55,000.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipguard import ClipguardError
from clipguard.data.fmnist import ImageSet, load_fmnist
from clipguard.data.pairs import _CaptionList

CORPUS_IMAGES = 55_000  # train[:55000] feed the web corpus and the shots; train[55000:] is the validation split

COLOURS = {
    "red": (0.9, 0.2, 0.2), "green": (0.2, 0.8, 0.3), "blue": (0.25, 0.4, 0.95), "yellow": (0.95, 0.9, 0.2),
    "orange": (0.95, 0.55, 0.15), "purple": (0.6, 0.3, 0.8), "white": (1.0, 1.0, 1.0), "pink": (0.95, 0.5, 0.7),
}
BACKGROUNDS = {
    "black": (0.0, 0.0, 0.0), "grey": (0.4, 0.4, 0.4), "dark blue": (0.05, 0.1, 0.3), "brown": (0.3, 0.2, 0.1),
    "dark green": (0.05, 0.25, 0.1), "beige": (0.75, 0.7, 0.55),
}
PLAIN_FORMS = ("a photo of a {x}", "a black and white photo of a {x}", "a {x}")
FORMS = ("{a} {c} {x} on a {b} background", "a photo of {a} {c} {x}", "{a} {c} {x}, {b} background",
         "product photo of {a} {c} {x} on {b}")


def web_spec(spec: str) -> float | None:
    """The plain share of a ``fmnist-web`` or ``fmnist-web:plain=P`` captions spec; None for another spec."""
    if spec == "fmnist-web":
        return 0.0
    if not spec.startswith("fmnist-web:"):
        return None
    key, _, value = spec[len("fmnist-web:"):].partition("=")
    try:
        share = float(value) if key == "plain" else None
    except ValueError:
        share = None
    if share is None or not 0 <= share <= 1:
        raise ClipguardError(f"--captions {spec!r}: expected fmnist-web:plain=P with P between 0 and 1 "
                             "(the share of plain pairs)")
    return share


VALIDATION_SLICES = {"train": f"train[:{CORPUS_IMAGES}]", "test": f"train[{CORPUS_IMAGES}:]"}  # fmnist-val's splits


def validation_slice(dataset, split: str) -> str | None:
    """What ``split`` of ``fmnist-val`` holds, in words ("Fashion-MNIST train[55000:]"); None for other specs."""
    return f"Fashion-MNIST {VALIDATION_SLICES[split]}" if str(dataset) == "fmnist-val" else None


def validation_split(split: str) -> ImageSet:
    """``fmnist-val``: its train split is Fashion-MNIST train[:55000], its test split train[55000:]."""
    train = load_fmnist("train")
    index = torch.arange(CORPUS_IMAGES) if split == "train" else torch.arange(CORPUS_IMAGES, len(train))
    return train.subset(index)


class WebCorpus(_CaptionList):
    """Fashion-MNIST train items rendered as web photos with descriptive captions (module docstring).

    positions: which of the 55,000 corpus pairs this (sub)corpus holds; each renders from its own position.
    """

    streamed = False  # rendered from the in-memory images; cheap, in any process

    def __init__(self, positions: torch.Tensor | None = None, captions: tuple[str, ...] | None = None,
                 plain_share: float = 0.0):
        self.train, self.plain_share = load_fmnist("train"), plain_share
        self.positions = torch.arange(CORPUS_IMAGES) if positions is None else torch.as_tensor(positions)
        self.size, self.workers = 28, 0
        self.captions = captions if captions is not None else tuple(self._plan(int(p))[-1] for p in self.positions)

    def __len__(self) -> int:
        return len(self.positions)

    def _plain(self, position: int) -> bool:
        if not self.plain_share:
            return False
        return float(torch.rand(1, generator=torch.Generator().manual_seed(7_000_003 * position + 29))) < self.plain_share

    def _plan(self, position: int):
        """The rendering of corpus pair ``position``: (colour, background, scale, row, col, second, caption);
        colour None for a plain pair."""
        g = torch.Generator().manual_seed(1_000_003 * position + 17)
        name = self.train.classes[int(self.train.labels[position])]
        if self._plain(position):
            form = PLAIN_FORMS[int(torch.randint(len(PLAIN_FORMS), (1,), generator=g))]
            return None, None, 28, 0, 0, None, form.format(x=name)
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=g))]
        background = list(BACKGROUNDS)[int(torch.randint(len(BACKGROUNDS), (1,), generator=g))]
        scale = 0.6 + 0.4 * float(torch.rand(1, generator=g))
        side = max(14, round(28 * scale))
        row, col = (int(v) for v in torch.randint(0, 28 - side + 1, (2,), generator=g))
        second = None
        if float(torch.rand(1, generator=g)) < 1 / 3:
            other = int(torch.randint(CORPUS_IMAGES, (1,), generator=g))
            if int(self.train.labels[other]) != int(self.train.labels[position]):
                second = other
        form = FORMS[int(torch.randint(len(FORMS), (1,), generator=g))]
        caption = form.format(a="an" if colour[0] in "aeiou" else "a", c=colour, x=name, b=background)
        if second is not None:
            caption += f" and a small {self.train.classes[int(self.train.labels[second])]}"
        return colour, background, side, row, col, second, caption

    def decode(self, index: int) -> torch.Tensor:
        position = int(self.positions[index])
        colour, background, side, row, col, second, _ = self._plan(position)
        if colour is None:  # a plain pair: the grey item as the evaluation shows it
            return self.train.images[position].expand(3, 28, 28).clone()
        canvas = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1).expand(3, 28, 28).clone()
        self._paste(canvas, position, torch.tensor(COLOURS[colour]), side, row, col)
        if second is not None:  # smaller, in the corner away from the main item
            small = 12
            r, c = (0 if row > 7 else 28 - small), (0 if col > 7 else 28 - small)
            self._paste(canvas, second, torch.tensor((0.85, 0.85, 0.85)), small, r, c)
        return canvas.mul(255).round().to(torch.uint8)

    def _paste(self, canvas: torch.Tensor, position: int, tint: torch.Tensor, side: int, row: int, col: int) -> None:
        grey = self.train.images[position].float().div(255)[None]  # (1, 1, 28, 28)
        item = F.interpolate(grey, size=(side, side), mode="bilinear", align_corners=False)[0]  # (1, s, s)
        region = canvas[:, row : row + side, col : col + side]
        region.mul_(1 - item).add_(item * tint.view(3, 1, 1))  # the item's grey level as its opacity

    def subset(self, index: torch.Tensor) -> "WebCorpus":
        index = torch.as_tensor(index)
        return WebCorpus(self.positions[index], tuple(self.captions[i] for i in index.tolist()), self.plain_share)
