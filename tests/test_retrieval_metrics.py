"""Retrieval metrics against hand-computed cases."""

import numpy as np
import pytest

from aurora_ds.tasks.retrieval_eval import retrieval_metrics


def test_perfect_and_hand_computed_ranks():
    # 3 images; image 0 has captions 0,1; image 1 has 2; image 2 has 3,4 (duplicate captions
    # per image: the best-ranked one counts).
    media2txt = [[0, 1], [2], [3, 4]]
    txt2media = [0, 0, 1, 2, 2]
    i2t = np.array([
        [0.1, 0.9, 0.5, 0.2, 0.3],  # best GT (caption 1) first            -> rank 0
        [0.8, 0.7, 0.6, 0.1, 0.0],  # caption 2 third                      -> rank 2
        [0.5, 0.4, 0.3, 0.2, 0.1],  # captions 3,4 at positions 3 and 4   -> rank 3
    ])
    t2i = np.array([
        [0.9, 0.1, 0.0],  # rank 0
        [0.2, 0.3, 0.1],  # image 0 second -> rank 1
        [0.1, 0.5, 0.2],  # rank 0
        [0.3, 0.2, 0.1],  # image 2 last  -> rank 2
        [0.0, 0.0, 0.9],  # rank 0
    ])
    m = retrieval_metrics(i2t, t2i, media2txt, txt2media)
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r5"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(60.0)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["txt_median_rank"] == 3.0  # ranks 1, 3, 4
    assert m["img_median_rank"] == 1.0  # ranks 1, 2, 1, 3, 1
    assert m["r_mean"] == pytest.approx(((100 / 3 + 100 + 100) / 3 + (60 + 100 + 100) / 3) / 2)


def test_ties_count_against_the_query():
    """A ground truth tied with others is ranked behind all of them (no lucky tie-breaks)."""
    media2txt, txt2media = [[0], [1]], [0, 1]
    i2t = np.array([[-100.0, -100.0], [0.5, 0.5]])
    t2i = np.array([[0.3, 0.3], [0.0, 1.0]])
    m = retrieval_metrics(i2t, t2i, media2txt, txt2media)
    assert m["txt_r1"] == 0.0  # both images tie their GT with another caption
    assert m["img_r1"] == 50.0  # text 0 ties, text 1 wins
    assert m["txt_r5"] == 100.0


def test_five_captions_per_image_any_gt_counts():
    media2txt = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    txt2media = [0] * 5 + [1] * 5
    i2t = np.zeros((2, 10))
    i2t[0, 4] = 1.0  # the fifth caption of image 0 is the top hit
    i2t[1, 0] = 1.0  # image 1's top hit is a caption of image 0
    t2i = np.tile([[1.0, 0.0]], (10, 1))
    m = retrieval_metrics(i2t, t2i, media2txt, txt2media)
    assert m["txt_r1"] == 50.0
    assert m["img_r1"] == 50.0  # captions of image 0 right, of image 1 wrong
