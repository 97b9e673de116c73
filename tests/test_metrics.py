import math

import torch

from clipguard.eval.metrics import Rate, attack_success_rate, clean_accuracy, poisoned_accuracy
from clipguard.losses import clip_contrastive_loss


def test_clean_accuracy_counts_hits():
    rate = clean_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    assert (rate.hits, rate.total, rate.value) == (3, 4, 0.75)
    assert rate.as_dict("correct") == {"value": 0.75, "correct": 3, "total": 4}


def test_asr_excludes_target_class_images():
    labels = torch.tensor([0, 1, 2, 3, 3, 3])
    predictions = torch.tensor([3, 3, 0, 3, 3, 3])  # target-class images all "hit" but must not count
    rate = attack_success_rate(predictions, labels, target=3)
    assert (rate.hits, rate.total) == (2, 3)
    assert math.isclose(rate.value, 2 / 3)


def test_poisoned_accuracy_uses_true_labels_of_non_target_images():
    labels = torch.tensor([0, 1, 2, 2])
    predictions = torch.tensor([0, 2, 2, 2])
    rate = poisoned_accuracy(predictions, labels, target=2)
    assert (rate.hits, rate.total) == (1, 2)


def test_empty_rate_is_nan_not_error():
    assert math.isnan(Rate(0, 0).value)


def test_contrastive_loss_known_values():
    aligned = torch.eye(4)
    assert clip_contrastive_loss(aligned, aligned, 100.0) < 1e-3
    # all features equal: every column equally likely, loss = log(B)
    same = torch.nn.functional.normalize(torch.ones(4, 2), dim=-1)
    assert math.isclose(clip_contrastive_loss(same, same, 1.0).item(), math.log(4), rel_tol=1e-5)


def test_contrastive_loss_treats_identical_captions_as_positives():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    swapped = texts[[1, 0, 2, 3]]  # captions 0 and 1 are the same text: which is which cannot matter
    ids = torch.tensor([0, 0, 1, 2])
    grouped = clip_contrastive_loss(images, texts, 10.0, caption_ids=ids)
    assert torch.isclose(grouped, clip_contrastive_loss(images, swapped, 10.0, caption_ids=ids))
    plain = clip_contrastive_loss(images, texts, 10.0)
    assert not torch.isclose(plain, clip_contrastive_loss(images, swapped, 10.0))
