import os
import random

import pytest
import torch

# the models under test are tiny: one thread avoids oversubscribing the machine's two cores
torch.set_num_threads(int(os.environ.get("UNIMODAL_TEST_THREADS", "1")))

from unimodal.sequence import Image, Sample, Text, Video


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def random_sample(rng: random.Random, channels: int = 2, patch: int = 1, vocab: int = 50,
                  max_segments: int = 3, label: bool = True) -> Sample:
    """A sample of 1..max_segments text / image / video segments in random order with random
    block sizes (from one patch to the whole segment)."""
    segs = []
    for _ in range(rng.randint(1, max_segments)):
        kind = rng.choice(["text", "image", "video"])
        if kind == "text":
            segs.append(Text(torch.randint(0, vocab, (rng.randint(1, 6),))))
        elif kind == "image":
            k = rng.choice([1, 2, 4])
            grid = k * rng.choice([1, 2])
            block = rng.choice([k * k, grid * grid, None])
            segs.append(Image(torch.randn(channels, grid * patch, grid * patch), block=block))
        else:
            f = rng.choice([1, 2])
            T = f * rng.choice([1, 2])
            segs.append(Video(torch.randn(T, channels, 2 * patch, 2 * patch), frames_per_block=f))
    return Sample(segs, label=rng.randint(0, 9) if label and rng.random() < 0.8 else None)
