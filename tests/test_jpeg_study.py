"""The statistics of Table 1's data study (studies/jpeg_sensitivity.py): McNemar's test and PSNR,
against textbook values computed here independently."""
import math
import sys

import numpy as np
import pytest

from mdeq.engine import paths

sys.path.insert(0, str(paths.ROOT / "studies"))
from jpeg_sensitivity import mcnemar, pil_jpeg, psnr  # noqa: E402


def _binom_two_sided(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n / 2, by summing the pmf."""
    pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    return min(1.0, sum(p for i, p in enumerate(pmf) if i <= k or i >= n - k))


@pytest.mark.parametrize("b,c", [(54, 34), (16, 19), (126, 56), (3, 0), (0, 0)])
def test_mcnemar_counts_the_discordant_pairs(b, c):
    rng = np.random.default_rng(b * 1000 + c)
    both = rng.integers(0, 2, size=300).astype(bool)  # concordant pairs: right or wrong on both
    ref = np.concatenate([both, np.ones(b, bool), np.zeros(c, bool)])
    other = np.concatenate([both, np.zeros(b, bool), np.ones(c, bool)])
    perm = rng.permutation(len(ref))
    out = mcnemar(ref[perm], other[perm])
    assert (out["b_right_on_exact_only"], out["c_right_on_version_only"]) == (b, c)
    n = b + c
    assert out["chi2"] == pytest.approx((abs(b - c) - 1) ** 2 / n if n else 0.0)
    assert out["p_exact"] == pytest.approx(_binom_two_sided(min(b, c), n) if n else 1.0, rel=1e-12)


def test_psnr_and_the_jpeg_round_trip():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 3, 32, 32)).astype(np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] ^= 16  # one pixel off by 16: MSE = 256 / a.size
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 * a.size / 256))
    assert psnr(a, a) == math.inf
    smooth = np.repeat(np.repeat(rng.integers(0, 256, size=(4, 3, 4, 4)), 8, axis=2), 8, axis=3).astype(np.uint8)
    q95, q30 = pil_jpeg(smooth, 95), pil_jpeg(smooth, 30)
    assert q95.shape == smooth.shape and q95.dtype == np.uint8
    assert psnr(smooth, q95) > psnr(smooth, q30) > 15  # lower quality, more error; still the same images


def test_paired_training_page_part_is_drawn_from_the_json():
    from jpeg_paired_training import render

    assert render(None).startswith("**Not run yet.**")
    runs = {f"{t}_seed{s}": {"epochs": 50, "test_exact": e, "test_jpeg": j}
            for (t, s, e, j) in [("exact", 0, 38.0, 37.0), ("jpeg", 0, 36.0, 38.0),
                                 ("exact", 1, 40.0, 39.0), ("jpeg", 1, 37.0, 38.0)]}
    md = render({"protocol": "cifar10_small_paper", "train_images": "T", "test_images": "E", "seeds": [0, 1],
                 "runs": runs, "provenance": {"hardware": {"cpu": "X"}, "git_commit": "abc", "date": "d",
                                              "command": "c"}})
    assert "| exact pixels | 39.00 ± 1.41 | 38.00 ± 1.41 |" in md and "| JPEG-q75 | 36.50 ± 0.71 | 38.00 ± 0.00 |" in md
    # paired by seed: exact minus JPEG = (2, 3) on exact test images, (-1, 1) on JPEG ones
    assert "2.50 ± 0.71 points on the exact test images, 0.00 ± 1.41 on their JPEG twins" in md
