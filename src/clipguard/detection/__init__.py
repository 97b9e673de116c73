"""Is a CLIP backdoored? Detectors that invert a trigger from clean shots, and the verdict.

inversion.py holds the contrastive trigger inversion that ``clipguard detect`` and CBPT share;
each other file is one registered detector (base.py: the contract).
"""

from clipguard.detection import encoder, full_image  # noqa: F401  (registration)
from clipguard.detection import patch  # noqa: F401  (registration)
from clipguard.detection import text  # noqa: F401  (registration)
from clipguard.detection.base import DETECTORS, Detector, DetectorConfig, Finding, get_detector, register

__all__ = ["DETECTORS", "Detector", "DetectorConfig", "Finding", "get_detector", "register"]
