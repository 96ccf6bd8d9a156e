"""The one feature function: per-sample statistics that reveal distribution shift.

Devices store these derived features instead of raw inputs (private by default, ~20 floats a sample),
and the control plane computes the same features on its training data as the drift reference, so both
sides must call :func:`features` and name columns with :func:`feature_names`. The names are a contract:
add new features at the end under new names, never rename or reorder.

A sample is laid out as rows x cols x channels: ``(H, W, C)`` images and spectrograms as they are,
``(H, W)`` as one channel, and a flat vector ``(F,)`` as one row of ``F`` columns (so its "cols"
gradient is the plain difference of neighbours and its "rows" gradient is 0).

Columns, all computed over one sample's values:

- ``mean``, ``std``, ``min``, ``max``: level, spread and range (brightness, gain, clipping).
- ``p05``, ``p50``, ``p95``: percentiles with linear interpolation, robust to a few outliers.
- ``contrast``: ``p95 - p05``.
- ``saturated_low`` / ``saturated_high``: fraction of values within 2% of the sample's range from its
  min / max (blown highlights, crushed shadows, a clipped microphone; 1.0 for a constant sample).
- ``gradient_energy_rows`` / ``gradient_energy_cols``: mean squared difference of neighbours along rows /
  cols (sharpness: blur and defocus lower it, noise raises it; 0 along an axis of length 1).
- ``centre_minus_border``: mean of the central half (rows and cols ``[n//4, n - n//4)``) minus the mean of
  the rest (occlusion, framing, a dirty lens; 0 when a sample is too small to have a border).
- ``quadrant_mean_tl|tr|bl|br``: means of the four quadrants (lighting direction, off-centre objects);
  with an odd size the middle row or column belongs to both halves.
- ``channel_mean_<c>``: mean per channel, only when a sample has more than one channel (colour cast).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edge.errors import SamplingError

SATURATION_TOLERANCE = 0.02  # share of a sample's value range that counts as "at" its min or max
PERCENTILES = (5.0, 50.0, 95.0)
BASE_FEATURES = (
    "mean", "std", "min", "max", "p05", "p50", "p95", "contrast", "saturated_low", "saturated_high",
    "gradient_energy_rows", "gradient_energy_cols", "centre_minus_border",
    "quadrant_mean_tl", "quadrant_mean_tr", "quadrant_mean_bl", "quadrant_mean_br",
)


def sample_layout(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(rows, cols, channels)`` of one sample of ``input_shape`` (no batch dimension)."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or len(shape) > 3 or min(shape) < 1:
        raise SamplingError(
            f"cannot compute features for samples of shape {shape}: expected (F,), (H, W) or (H, W, C) with "
            "positive sizes and no batch dimension")
    if len(shape) == 1:
        return 1, shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1], 1
    return shape  # type: ignore[return-value]


def feature_names(input_shape: tuple[int, ...]) -> list[str]:
    """Column names of :func:`features` for samples of ``input_shape`` (without the batch dimension)."""
    return list(feature_names_of(tuple(input_shape)))


@lru_cache(maxsize=16)
def feature_names_of(input_shape: tuple[int, ...]) -> tuple[str, ...]:
    """:func:`feature_names` as a cached tuple, for callers on a hot path."""
    channels = sample_layout(input_shape)[2]
    return (*BASE_FEATURES, *(f"channel_mean_{c}" for c in range(channels if channels > 1 else 0)))


@dataclass(frozen=True)
class _Plan:
    """What :func:`features` precomputes once per sample shape, so that a call is ~30 numpy operations."""

    layout: tuple[int, int, int]
    size: int
    centre: tuple[slice, slice]  # rows and cols of the central half
    centre_size: int  # values in the central half (all channels)
    quadrants: tuple[tuple[slice, slice], ...]  # tl, tr, bl, br; an odd middle row/col is in both halves
    percentile_below: np.ndarray  # index in the sorted values at or just below each percentile
    percentile_above: np.ndarray  # ... and the next one
    percentile_fraction: np.ndarray  # interpolation weight of the value above
    column_scale: np.ndarray  # turns the counts and sums features() collects into fractions and means


@lru_cache(maxsize=4)  # a device serves one or two input shapes
def _plan(input_shape: tuple[int, ...]) -> _Plan:
    layout = sample_layout(input_shape)
    rows, cols, channels = layout
    size = rows * cols * channels
    centre = (slice(rows // 4, rows - rows // 4), slice(cols // 4, cols - cols // 4))
    centre_size = (rows - 2 * (rows // 4)) * (cols - 2 * (cols // 4)) * channels
    halves_rows = (slice(0, (rows + 1) // 2), slice(rows // 2, rows))
    halves_cols = (slice(0, (cols + 1) // 2), slice(cols // 2, cols))
    quadrants = tuple((row_half, col_half) for row_half in halves_rows for col_half in halves_cols)
    positions = np.array(PERCENTILES) / 100.0 * (size - 1)  # linear interpolation, as np.percentile
    below = np.floor(positions).astype(np.intp)
    column_scale = np.ones(len(BASE_FEATURES) + (channels if channels > 1 else 0), np.float32)
    column_scale[8:10] = 1.0 / size  # saturated values counted
    column_scale[10] = 1.0 / max((rows - 1) * cols * channels, 1)  # squared differences summed
    column_scale[11] = 1.0 / max(rows * (cols - 1) * channels, 1)
    return _Plan(layout, size, centre, centre_size, quadrants, below, np.minimum(below + 1, size - 1),
                 (positions - below).astype(np.float32), column_scale)


def _region_means(image: np.ndarray, plan: _Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float64 means per sample: everything, centre minus border, the four quadrants, each channel.

    Summed in float64, so the float32 result does not depend on the CPU's summation order (a BLAS
    float32 product rounded a constant 0.7 to 0.7000091 on AVX-512 and to 0.7 on AVX2): the device and
    the control plane compute the same features on different CPUs.
    """
    total = image.sum(axis=(1, 2, 3), dtype=np.float64)
    mean = total / plan.size
    rows, cols = plan.centre
    centre_sum = image[:, rows, cols].sum(axis=(1, 2, 3), dtype=np.float64)
    border_size = plan.size - plan.centre_size
    if border_size:
        centre_minus_border = centre_sum / plan.centre_size - (total - centre_sum) / border_size
    else:
        centre_minus_border = np.zeros_like(mean)
    quadrants = np.stack([image[:, r, c].mean(axis=(1, 2, 3), dtype=np.float64) for r, c in plan.quadrants], axis=1)
    channels = image.mean(axis=(1, 2), dtype=np.float64) if plan.layout[2] > 1 else np.zeros((len(image), 0))
    return mean, centre_minus_border, quadrants, channels


def features(batch: np.ndarray) -> np.ndarray:
    """Float32 ``(N, F)`` features of a batch ``(N, *input_shape)``; columns as :func:`feature_names`.

    Deterministic and NaN-free for finite inputs (a constant sample gives its exact mean and exact zeros
    for spread, contrast, gradients and centre minus border); region means are summed in float64, so they
    round the same on every CPU. Written for
    the one-sample call a device makes: at that size numpy's per-call overhead is most of the cost, so
    columns are filled in place (indices as in :data:`BASE_FEATURES`) and sums scaled once at the end.
    """
    batch = np.asarray(batch)
    plan = _plan(batch.shape[1:])
    count, (rows, cols, _) = batch.shape[0], plan.layout
    image = batch.reshape(count, *plan.layout).astype(np.float32, copy=False)
    flat = image.reshape(count, plan.size)
    out = np.zeros((count, len(plan.column_scale)), np.float32)  # sums first, scaled to means at the end
    mean, centre_minus_border, quadrants, channel_means = _region_means(image, plan)
    out[:, 0], out[:, 12], out[:, 13:17], out[:, 17:] = mean, centre_minus_border, quadrants, channel_means

    ordered = np.sort(flat, axis=1)  # numpy's vectorised sort beats np.partition with several kth
    low, high = ordered[:, 0], ordered[:, -1]
    below, above = ordered[:, plan.percentile_below], ordered[:, plan.percentile_above]
    percentiles = below + (above - below) * plan.percentile_fraction
    out[:, 2], out[:, 3], out[:, 4:7] = low, high, percentiles
    out[:, 7] = percentiles[:, 2] - percentiles[:, 0]

    # variance around the median: exactly 0 for a constant sample, and |mean - median| <= std bounds the
    # cancellation in E[d^2] - (mean - median)^2
    from_median = flat - percentiles[:, 1:2]
    mean_minus_median = (mean - percentiles[:, 1]).astype(np.float32)
    variance = np.vecdot(from_median, from_median) / plan.size - mean_minus_median * mean_minus_median
    out[:, 1] = np.sqrt(np.maximum(variance, 0.0))

    # a binary search in each sorted row beats comparing every value, even looping over a batch
    tolerance = SATURATION_TOLERANCE * (high - low)
    low_threshold, high_threshold = low + tolerance, high - tolerance
    for index, row in enumerate(ordered):
        out[index, 8] = row.searchsorted(low_threshold[index], "right")
        out[index, 9] = plan.size - row.searchsorted(high_threshold[index], "left")

    if rows > 1:
        differences = (image[:, 1:] - image[:, :-1]).reshape(count, -1)
        out[:, 10] = np.vecdot(differences, differences)
    if cols > 1:
        differences = (image[:, :, 1:] - image[:, :, :-1]).reshape(count, -1)
        out[:, 11] = np.vecdot(differences, differences)
    out *= plan.column_scale
    return out
