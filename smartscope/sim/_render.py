"""How the simulated specimens image their nuclei: drawing, defocus and camera.

`LiveSpecimen` and `PlateSpecimen` differ in where their nuclei are and what
they look like (cell cycle and light damage; wells and hits), not in how a
field of nuclei becomes a frame. What they share lives here:
`FluorescenceImaging` (brightness, optics and camera parameters, and the camera
model `FluorescenceImaging._expose`), `Nuclei` with `draw_nuclei` and
`label_nuclei` (anti-aliased ellipses with a domed profile, chromatin texture
and a dim nucleolus), `chromatin_texture`, and `defocused` (the field drawn
with the padding its Gaussian defocus blur needs, blurred and cropped).

Every function here is deterministic: a specimen that keeps its random draws
in the same order renders the same frames, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "TEXTURE_PERIOD_UM",
    "FluorescenceImaging",
    "Nuclei",
    "blur_margin",
    "check_field",
    "chromatin_texture",
    "defocused",
    "draw_nuclei",
    "gaussian_blur",
    "label_nuclei",
]

# chromatin texture: a periodic noise tile of _TEXTURE_SIZE² samples,
# _TEXTURE_STEP_UM apart (the size must be a power of two)
_TEXTURE_SIZE = 128
_TEXTURE_STEP_UM = 0.5
#: period (µm) of the chromatin texture: nuclei sample it at an offset in
#: ``[0, TEXTURE_PERIOD_UM)``
TEXTURE_PERIOD_UM = _TEXTURE_SIZE * _TEXTURE_STEP_UM
# defocus blurs at least this wide (sigma, pixels) are computed at half resolution
_HALF_RES_SIGMA = 2.5
# narrower defocus blurs (sigma, pixels) are not computed at all
_MIN_BLUR_SIGMA = 0.25

#: vignetted illumination per frame shape (see `_illumination`); read-only arrays
_ILLUMINATION: dict[tuple[int, int], np.ndarray] = {}


class FluorescenceImaging:
    """How a simulated specimen of nuclei is imaged: brightness, optics, camera.

    The base of `LiveSpecimen` and `PlateSpecimen`. The class attributes may be
    changed on an instance.
    """

    #: brightness of a nucleus at intensity 1, photons / ms / pixel (1 µm²)
    photons_per_ms: float = 60.0
    #: autofluorescence background, photons / ms / µm² at intensity 1
    background_per_ms: float = 0.3
    #: camera offset (ADU), read noise (e⁻ rms) and gain (ADU / e⁻)
    offset_adu: float = 100.0
    read_noise_e: float = 2.0
    gain_adu_per_e: float = 1.0
    #: Gaussian blur (µm, sigma) per µm of defocus
    defocus_blur_per_um: float = 0.5

    def _expose(
        self, field: np.ndarray, noise: np.ndarray, pixel_size_um: float, dose: float
    ) -> np.ndarray:
        """Photons to camera counts: the frame of `field` exposed for `dose`.

        `field` (photons / ms / µm² at intensity 1, modified in place) plus the
        autofluorescence `background_per_ms`, times the slightly uneven
        illumination and ``dose * pixel_size_um²`` (`dose`: exposure ms ×
        intensity) are the expected photo-electrons; shot noise (Gaussian
        approximation of Poisson, exact mean and variance, from the standard
        normal `noise`) and read noise are added, then gain and offset
        (`gain_adu_per_e`, `read_noise_e`, `offset_adu`). Returns ``uint16``.
        """
        lam = field
        lam += self.background_per_ms
        lam *= _illumination(field.shape)
        lam *= dose * pixel_size_um * pixel_size_um
        np.maximum(lam, 0.0, out=lam)  # dark chromatin texture can dip below 0
        gain = self.gain_adu_per_e
        sigma = np.multiply(lam, gain * gain)
        sigma += self.read_noise_e**2
        np.sqrt(sigma, out=sigma)
        noise *= sigma
        adu = np.multiply(lam, gain, out=lam)
        adu += noise
        adu += self.offset_adu
        np.clip(adu, 0, 65535, out=adu)
        return np.rint(adu, out=adu).astype(np.uint16)


@dataclass(frozen=True)
class Nuclei:
    """Nuclei to draw into a frame, one array element per nucleus.

    Attributes
    ----------
    col, row : numpy.ndarray
        Center of each nucleus in pixels of the frame (column, row; float).
    a, b : numpy.ndarray
        Semi-axes (µm) along and across the long axis (float64).
    phi : numpy.ndarray
        Angle (rad) of the long axis from the +x (column) axis (float64).
    bright : numpy.ndarray
        Relative brightness (× `FluorescenceImaging.photons_per_ms`).
    tu, tv : numpy.ndarray
        Offset (µm) of each nucleus in the chromatin texture.
    nu, nv : numpy.ndarray
        Position of the nucleolus, in units of the semi-axes.
    texture_amp : float | numpy.ndarray
        Amplitude of the chromatin texture (one for all, or per nucleus).
    """

    col: np.ndarray
    row: np.ndarray
    a: np.ndarray
    b: np.ndarray
    phi: np.ndarray
    bright: np.ndarray
    tu: np.ndarray
    tv: np.ndarray
    nu: np.ndarray
    nv: np.ndarray
    texture_amp: float | np.ndarray = 0.12

    def __len__(self) -> int:
        return len(self.col)


def _patches(
    nuclei: Nuclei, shape: tuple[int, int], ps: float
) -> tuple[np.ndarray, ...]:
    """Square pixel patches around each nucleus, ``(N, P, P)`` arrays.

    Returns ``u, v`` (µm from the nucleus' center along and across its long
    axis), ``rho2`` (squared elliptic radius: 1 on the rim), ``valid`` (inside
    the frame) and ``flat`` (flat index into the frame) of each patch pixel.
    """
    H, W = shape
    a, b = nuclei.a, nuclei.b
    half = math.ceil(float(a.max()) / ps + 1.5)
    offsets = np.arange(-half, half + 1)
    cols = np.rint(nuclei.col).astype(np.int64)[:, None] + offsets  # (N, P)
    rows = np.rint(nuclei.row).astype(np.int64)[:, None] + offsets
    dx = ((cols - nuclei.col[:, None]) * ps)[:, None, :]  # (N, 1, P) µm
    dy = ((rows - nuclei.row[:, None]) * ps)[:, :, None]  # (N, P, 1) µm
    cos = np.cos(nuclei.phi)[:, None, None]
    sin = np.sin(nuclei.phi)[:, None, None]
    u = dx * cos + dy * sin  # along the long axis
    v = dy * cos - dx * sin
    rho2 = (u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2
    valid = (
        (rows[:, :, None] >= 0)
        & (rows[:, :, None] < H)
        & (cols[:, None, :] >= 0)
        & (cols[:, None, :] < W)
    )
    flat = rows[:, :, None] * W + cols[:, None, :]
    return u, v, rho2, valid, flat


def label_nuclei(
    nuclei: Nuclei, ids: np.ndarray, shape: tuple[int, int], pixel_size_um: float
) -> np.ndarray:
    """Instance labels of a frame: `ids` (dtype kept) where a nucleus is, else 0.

    A pixel belongs to a nucleus when its center lies inside the ellipse; where
    nuclei overlap, one of them wins.
    """
    H, W = shape
    if len(nuclei) == 0:
        return np.zeros((H, W), ids.dtype)
    _, _, rho2, valid, flat = _patches(nuclei, shape, pixel_size_um)
    inside = valid & (rho2 <= 1.0)
    labels = np.broadcast_to(ids[:, None, None], rho2.shape)
    out = np.zeros(H * W, ids.dtype)
    out[flat[inside]] = labels[inside]
    return out.reshape(H, W)


def draw_nuclei(
    nuclei: Nuclei,
    shape: tuple[int, int],
    pixel_size_um: float,
    texture: np.ndarray,
    photons_per_ms: float,
) -> np.ndarray:
    """Noise-free light (photons / ms / µm², ``float32``) of `nuclei` in a frame.

    Each nucleus is an anti-aliased ellipse with a domed profile, chromatin
    `texture` (a `chromatin_texture` tile) and a dim nucleolus.
    """
    H, W = shape
    if len(nuclei) == 0:
        return np.zeros((H, W), np.float32)
    ps = pixel_size_um
    u, v, rho2, valid, flat = _patches(nuclei, shape, ps)
    # only pixels that receive light from a nucleus (most of a patch does not)
    edge_um = math.hypot(ps, 0.5)  # anti-aliasing + in-focus optics
    r_eq = np.sqrt(nuclei.a * nuclei.b)
    reach2 = ((1 + 0.5 * edge_um / r_eq) ** 2)[:, None, None]
    k, i, j = np.nonzero(valid & (rho2 < reach2))
    u, v, rho2, flat = u[k, i, j], v[k, i, j], rho2[k, i, j], flat[k, i, j]
    mask = np.clip(0.5 + (1 - np.sqrt(rho2)) * r_eq[k] / edge_um, 0, 1)
    mod = _TEXTURE_SIZE - 1
    tex_col = np.rint((u + nuclei.tu[k]) / _TEXTURE_STEP_UM).astype(np.int64)
    tex_row = np.rint((v + nuclei.tv[k]) / _TEXTURE_STEP_UM).astype(np.int64)
    amp = nuclei.texture_amp
    if isinstance(amp, np.ndarray):
        amp = amp[k]
    nucleolus = (u / nuclei.a[k] - nuclei.nu[k]) ** 2 + (
        v / nuclei.b[k] - nuclei.nv[k]
    ) ** 2
    chromatin = (
        1
        + amp * texture[tex_row & mod, tex_col & mod]
        - 0.3 * np.exp(-nucleolus / 0.045)
    )
    profile = 1 - 0.3 * np.minimum(rho2, 1)
    value = (nuclei.bright[k] * photons_per_ms) * mask * profile * chromatin
    field = np.bincount(flat, weights=value, minlength=H * W)
    return field.reshape(H, W).astype(np.float32)


def chromatin_texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth periodic noise tile (unit std) that nuclei sample (`draw_nuclei`)."""
    texture = gaussian_blur(
        rng.standard_normal((_TEXTURE_SIZE, _TEXTURE_SIZE)).astype(np.float32),
        0.8 / _TEXTURE_STEP_UM,
    )
    return texture / texture.std()


def check_field(shape: tuple[int, int], pixel_size_um: float) -> tuple[int, int, float]:
    """``(h, w, pixel_size_um)`` of a field of view; `ValueError` if empty."""
    h, w = (int(v) for v in shape)
    ps = float(pixel_size_um)
    if h <= 0 or w <= 0 or ps <= 0:
        raise ValueError(f"invalid shape {shape} or pixel size {pixel_size_um}")
    return h, w, ps


#: How far past 3 sigma `blur_margin` looks for fast FFT lengths.
_MARGIN_SEARCH = 512


def blur_margin(h: int, w: int, sigma_px: float) -> int:
    """Padding (px) a ``(h, w)`` field needs for a defocus blur of `sigma_px`.

    0 for blurs too narrow to compute; else at least 3 sigma, grown until
    `gaussian_blur` has fast FFT lengths.
    """
    if sigma_px < _MIN_BLUR_SIGMA:
        return 0
    fast = scipy.fft.next_fast_len
    base = math.ceil(3 * sigma_px)

    def fits(margin: int, step: int) -> bool:
        return not any(
            (n + 2 * margin) % step
            or fast((n + 2 * margin) // step, True) != ((n + 2 * margin) // step)
            for n in (h, w)
        )

    # fast FFT lengths for both sides at once (at half resolution for wide
    # blurs, which needs even sides); odd or unlucky shapes may have none
    # nearby: then full resolution, then any length (slower, never stuck)
    steps = (2, 1) if sigma_px >= _HALF_RES_SIGMA else (1,)
    for step in steps:
        for margin in range(base, base + _MARGIN_SEARCH):
            if fits(margin, step):
                return margin
    return base


def defocused(
    draw: Callable[[int], np.ndarray], shape: tuple[int, int], sigma_px: float
) -> np.ndarray:
    """A ``(h, w)`` field blurred by a defocus of `sigma_px` (Gaussian sigma).

    ``draw(margin)`` returns the sharp field padded by `margin` pixels on every
    side (`blur_margin`), so that light from just outside the field blurs in.
    """
    h, w = shape
    margin = blur_margin(h, w, sigma_px)
    field = draw(margin)
    if margin:
        field = gaussian_blur(field, sigma_px)[margin:-margin, margin:-margin]
    return field


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur by multiplication in Fourier space (periodic boundaries).

    Wide blurs are computed at half resolution (2 × 2 binning, blur, linear
    upsampling, with sigma reduced to compensate for the binning and the
    interpolation), four times fewer FFT points for an indistinguishable result.
    """
    if sigma_px >= _HALF_RES_SIGMA and not (image.shape[0] % 2 or image.shape[1] % 2):
        half = image[0::2, 0::2] + image[1::2, 0::2]
        half += image[0::2, 1::2]
        half += image[1::2, 1::2]
        half *= 0.25
        # binning adds 1/3 px², linear interpolation 2/3 px² of variance per axis
        blurred = _fft_blur(half, math.sqrt(sigma_px**2 - 1.0) / 2)
        return _upsample2(blurred)
    return _fft_blur(image, sigma_px)


def _fft_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    h, w = image.shape
    c = -2 * (math.pi * sigma_px) ** 2  # the kernel is separable: exp(c fy²) exp(c fx²)
    ky = np.exp(c * np.fft.fftfreq(h) ** 2).astype(np.float32)
    kx = np.exp(c * np.fft.rfftfreq(w) ** 2).astype(np.float32)
    spectrum = scipy.fft.rfft2(image.astype(np.float32, copy=False), workers=1)
    spectrum *= ky[:, None]
    spectrum *= kx[None, :]
    out = scipy.fft.irfft2(spectrum, s=(h, w), overwrite_x=True, workers=1)
    return out.astype(np.float32, copy=False)


def _upsample2(image: np.ndarray) -> np.ndarray:
    """Linear 2× upsampling of an image of 2 × 2 bins (edges held constant)."""
    h, w = image.shape
    p = np.pad(image, 1, mode="edge")
    rows = np.empty((2 * h, w + 2), np.float32)
    rows[0::2] = 0.75 * p[1:-1] + 0.25 * p[:-2]
    rows[1::2] = 0.75 * p[1:-1] + 0.25 * p[2:]
    out = np.empty((2 * h, 2 * w), np.float32)
    out[:, 0::2] = 0.75 * rows[:, 1:-1] + 0.25 * rows[:, :-2]
    out[:, 1::2] = 0.75 * rows[:, 1:-1] + 0.25 * rows[:, 2:]
    return out


def _illumination(shape: tuple[int, int]) -> np.ndarray:
    """Slightly uneven (vignetted) illumination of a field, 0.85..1 (cached)."""
    if (illum := _ILLUMINATION.get(shape)) is None:
        h, w = shape
        ry = np.linspace(-1, 1, h, dtype=np.float32)[:, None] ** 2
        rx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] ** 2
        illum = 1 - 0.075 * (rx + ry)
        illum.flags.writeable = False
        if len(_ILLUMINATION) >= 64:  # many ROI shapes: start over
            _ILLUMINATION.clear()
        _ILLUMINATION[shape] = illum
    return illum
