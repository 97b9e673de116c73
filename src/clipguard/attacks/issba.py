"""ISSBA (Li et al., ICCV 2021): a sample-specific, invisible trigger. A small steganographic
encoder hides a fixed secret bit string in each image as a bounded residual; a decoder trained
with it must recover the bits, which forces the residual to carry a consistent signal.

Invisibility is enforced by the hard bound ``epsilon`` (tanh output). An energy penalty on
top collapsed the encoder here: with weight 0.01 the residual went to 0 and the decoder
read the secret at chance level (bit accuracy 0.69); with no penalty, bit accuracy 1.0 and
mean |residual| 0.037 (max 0.06) on Fashion-MNIST. So the penalty defaults to 0.

The bound defaults to 0.1 (25.5/255). At 0.06 the backdoor did not take at this scale: ASR
31.49 % (2834/9000) at 3 % poisoning; at 0.1 it did: ASR 99.61 % (8965/9000), CA 89.35 %, with
mean |residual| 0.072 and PSNR 21.6 dB on the test images (ISSBA reports ~27 dB at 224 px
ImageNet; a 28 px grey image has far fewer pixels to spread the secret over)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from clipguard.attacks.base import Trigger, TriggerConfig, register

logger = logging.getLogger(__name__)


@dataclass
class ISSBAConfig(TriggerConfig):
    secret_bits: int = 16  # length of the hidden secret
    epsilon: float = 0.1  # max residual per pixel, in [0, 1] image units (invisibility bound)
    steps: int = 600  # encoder/decoder training steps
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # Adam learning rate
    residual_weight: float = 0.0  # weight of a residual-energy penalty (relative to epsilon^2)

    def __post_init__(self):
        self._check_range("secret_bits", 1, 256)
        self._check_range("epsilon", 0.0, 1.0)


class StegaEncoder(nn.Module):
    """(B, 3, H, W) image + (B, bits) secret -> (B, 3, H, W) residual in [-epsilon, epsilon]."""

    def __init__(self, bits: int, image_size: int, epsilon: float, width: int = 32):
        super().__init__()
        self.image_size, self.epsilon = image_size, epsilon
        self.secret_to_map = nn.Linear(bits, image_size * image_size)
        self.net = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 3, 3, padding=1),
        )

    def forward(self, images: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        plane = self.secret_to_map(secret).view(-1, 1, self.image_size, self.image_size)  # (B, 1, H, W)
        return self.epsilon * torch.tanh(self.net(torch.cat([images, plane], dim=1)))


class StegaDecoder(nn.Module):
    """(B, 3, H, W) image -> (B, bits) secret logits."""

    def __init__(self, bits: int, image_size: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.LazyLinear(bits),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@register
class ISSBA(Trigger):
    name = "issba"
    config_class = ISSBAConfig
    learned = True

    def __init__(self, config: ISSBAConfig, image_size: int):
        super().__init__(config, image_size)
        self.secret = torch.randint(0, 2, (config.secret_bits,), generator=self.generator).float()  # (bits,)
        torch.manual_seed(config.seed)
        self.encoder = StegaEncoder(config.secret_bits, image_size, config.epsilon)
        self.bit_accuracy = float("nan")  # decoder's accuracy on the fixed secret, set by fit()

    def fit(self, clip, train, target: int) -> None:
        """Train encoder + decoder on ``train`` images (``clip`` and ``target`` are not used)."""
        c = self.config
        torch.manual_seed(c.seed)
        decoder = StegaDecoder(c.secret_bits, self.image_size)
        decoder(torch.zeros(1, 3, self.image_size, self.image_size))  # materialise the lazy layer
        optimizer = torch.optim.Adam([*self.encoder.parameters(), *decoder.parameters()], lr=c.lr)
        for _ in tqdm(range(c.steps), desc="train ISSBA encoder", leave=False):
            batch = torch.randint(len(train), (c.batch_size,), generator=self.generator)
            images = train.float_images(batch)
            secrets = torch.randint(0, 2, (c.batch_size, c.secret_bits), generator=self.generator).float()
            stego = (images + self.encoder(images, secrets)).clamp(0, 1)
            loss = F.binary_cross_entropy_with_logits(decoder(stego), secrets)
            loss = loss + c.residual_weight * (stego - images).pow(2).mean() / c.epsilon**2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            images = train.float_images(torch.arange(min(512, len(train))))
            decoded = decoder(self.apply(images)) > 0
            self.bit_accuracy = (decoded == self.secret.bool()).float().mean().item()
        logger.info("ISSBA encoder trained: bit accuracy %.3f on the fixed secret", self.bit_accuracy)
        self.encoder.requires_grad_(False)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        secret = self.secret.to(images.device).expand(len(images), -1)
        with torch.no_grad():
            return images + self.encoder.to(images.device)(images, secret)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"secret": self.secret, **{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.secret = state["secret"].float()
        self.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
