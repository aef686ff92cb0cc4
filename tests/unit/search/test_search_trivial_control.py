"""The TrivialAugment-style control's batches: each image, each draw, gets exactly one kept
candidate, chosen uniformly, reproducibly under torch's seed."""
import torch

from jobs.mineaug.trivial import TrivialAugmentBatches

NAMES = ["HorizontalFlip", "VerticalFlip", "Invert"]   # deterministic: the result names the choice


def outcomes(x):
    return [x.flip(-1), x.flip(-2), -x]


def test_each_image_gets_exactly_one_candidate_drawn_uniformly():
    torch.manual_seed(0)
    images = torch.rand(600, 1, 8, 8) * 2 - 1
    batches = TrivialAugmentBatches(iter([{"image": images, "__key__": [str(i) for i in range(600)]}]), NAMES, 1)
    torch.manual_seed(11)
    out = next(batches)["image"]
    which = []
    for i in range(600):
        hits = [j for j, y in enumerate(outcomes(images[i])) if torch.allclose(out[i], y, atol=1e-5)]
        assert len(hits) == 1
        which.append(hits[0])
    counts = torch.bincount(torch.tensor(which), minlength=3)
    assert counts.min() > 150   # uniform over three: 200 each, give or take
    again = TrivialAugmentBatches(iter([{"image": images, "__key__": []}]), NAMES, 1)
    torch.manual_seed(11)
    assert torch.equal(next(again)["image"], out)
