"""Images and label maps decode to the right values in every mode Pillow opens, or are refused
naming the file and its mode; a worker's error reaches the user as one clean message.

Every fixture is built with numpy/Pillow (or written byte by byte, for the PNG/TIFF variants
Pillow cannot save) in ``tmp_path``; the expected values are computed from the stored samples.
"""
from __future__ import annotations

import json
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from acamkd.data import BadImageError, CityscapesSegmentation, CocoDetection, read_rgb_image
from acamkd.data import images as images_module
from acamkd.errors import user_message

RAMP16 = np.arange(65536, dtype=np.uint32).reshape(256, 256)  # every 16-bit value once: mean 0.5


# --------------------------------------------------------------------------- file writers
def write_png(path, samples, color_type, bit_depth, palette=None):
    """A PNG written byte by byte: ``samples`` (H, W) or (H, W, C) integers at ``bit_depth``
    (1, 2, 4, 8 or 16); the bit depths and colour types Pillow cannot save (16-bit colour,
    2/4-bit grey)."""
    samples = np.asarray(samples)
    h, w = samples.shape[:2]
    flat = samples.reshape(h, -1)
    rows = []
    for y in range(h):
        if bit_depth == 16:
            data = flat[y].astype(">u2").tobytes()
        elif bit_depth == 8:
            data = flat[y].astype(np.uint8).tobytes()
        else:
            bits = "".join(format(int(v), f"0{bit_depth}b") for v in flat[y])
            bits += "0" * (-len(bits) % 8)
            data = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))
        rows.append(b"\x00" + data)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    plte = chunk(b"PLTE", bytes(palette)) if palette is not None else b""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return path


def write_tiff(path, samples, bits, photometric, sample_format=1):
    """An uncompressed little-endian TIFF written byte by byte: ``samples`` (H, W) or (H, W, C);
    ``bits`` 8, 12 (packed, MSB first) or 16; ``photometric`` 0 = min-is-white, 1 = min-is-black,
    2 = RGB."""
    samples = np.asarray(samples)
    h, w = samples.shape[:2]
    spp = 1 if samples.ndim == 2 else samples.shape[2]
    if bits == 12:
        data = bytearray()
        for row in samples.reshape(h, -1):
            vals = [int(v) for v in row] + [0] * (len(row) % 2)
            for a, b in zip(vals[::2], vals[1::2]):
                data += bytes([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF])
        data = bytes(data)
    else:
        data = samples.astype({8: "<u1", 16: "<u2"}[bits]).tobytes()
    bps_offset = 8 + len(data)
    assert spp in (1, 3)
    extra = struct.pack(f"<{spp}H", *[bits] * spp) if spp > 2 else b""
    ifd_offset = bps_offset + len(extra) + (len(extra) % 2)
    bps_entry = (258, 3, spp, bps_offset) if spp > 2 else (258, 3, 1, bits)
    entries = [(256, 4, 1, w), (257, 4, 1, h), bps_entry, (259, 3, 1, 1), (262, 3, 1, photometric),
               (273, 4, 1, 8), (277, 3, 1, spp), (278, 4, 1, h), (279, 4, 1, len(data)),
               (339, 3, 1, sample_format)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd_offset) + data + extra + b"\0" * (len(extra) % 2) + ifd)
    return path


def save(path, image, fmt=None, **kw):
    image.save(path, format=fmt, **kw)
    return path


def rgb(path):
    """``read_rgb_image`` as numpy ``(H, W, 3)``, after checking the contract: float32, [0, 1]."""
    t = read_rgb_image(str(path))
    assert t.dtype == torch.float32 and t.dim() == 3 and t.shape[0] == 3 and t.is_contiguous()
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    return t.permute(1, 2, 0).numpy()


def grey(values):
    """Expected ``(H, W, 3)`` for grey ``values`` already in [0, 1]."""
    v = np.asarray(values, dtype=np.float32)
    return np.repeat(v[..., None], 3, axis=2)


def assert_refused(path, mode):
    with pytest.raises(BadImageError) as info:
        read_rgb_image(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: image mode {mode!r}"), msg
    assert "on_bad_image='skip'" in msg and "Save it as" in msg, msg
    return msg


# --------------------------------------------------------------------------- 16-bit and wider grey
def test_16bit_grey_png_is_value_over_65535(tmp_path):
    path = save(tmp_path / "g16.png", Image.fromarray(RAMP16.astype(np.uint16)))
    assert Image.open(path).mode == "I;16"
    out = rgb(path)
    np.testing.assert_array_equal(out, grey(RAMP16.astype(np.float32) / np.float32(65535)))
    assert out.mean() == pytest.approx(0.5, abs=1e-6)  # was 0.99: Pillow's convert("RGB") clips at 255


@pytest.mark.parametrize("mode,dtype,opens_as", [("I;16", "<u2", "I;16"), ("I;16B", ">u2", "I;16B"),
                                                 ("I;16L", "<u2", "I;16")])
def test_16bit_grey_tiff_every_byte_order(tmp_path, mode, dtype, opens_as):
    values = RAMP16[::8, ::8]  # (32, 32), 0..65279
    im = Image.frombytes(mode, (32, 32), values.astype(dtype).tobytes())
    path = save(tmp_path / "g16.tiff", im)
    assert Image.open(path).mode == opens_as
    np.testing.assert_array_equal(rgb(path), grey(values.astype(np.float32) / np.float32(65535)))


@pytest.mark.parametrize("mode,dtype", [("I;16L", "<u2"), ("I;16N", "=u2"), ("I;16B", ">u2")])
def test_16bit_grey_modes_in_memory(mode, dtype):
    """I;16L and I;16N have no file that reopens in them: check the conversion itself."""
    values = np.array([[0, 1, 32768, 65535]])
    im = Image.frombytes(mode, (4, 1), values.astype(dtype).tobytes())
    out = images_module._decoded_values(im, "mem", None)
    np.testing.assert_array_equal(out, values.astype(np.float32) / np.float32(65535))


def test_12bit_tiff_is_value_over_4095(tmp_path):
    values = np.array([[0, 1, 2048, 4095], [4095, 0, 100, 7]])
    path = write_tiff(tmp_path / "g12.tiff", values, bits=12, photometric=1)
    with Image.open(path) as im:
        assert im.mode == "I;16" and images_module.tile_rawmode(im)[1] == "I;12"
    np.testing.assert_array_equal(rgb(path), grey(values.astype(np.float32) / np.float32(4095)))


@pytest.mark.parametrize("maxval", [65535, 1023])
def test_16bit_pgm_mode_I_is_value_over_maxval(tmp_path, maxval):
    values = np.array([[0, 1, maxval // 2, maxval]])
    path = tmp_path / "g.pgm"
    path.write_bytes(f"P5 4 1 {maxval}\n".encode() + values.astype(">u2").tobytes())
    assert Image.open(path).mode == "I"
    np.testing.assert_allclose(rgb(path), grey(values / maxval), atol=2 / 65535)  # Pillow rescales to 65535


def test_32bit_integer_tiff_refused(tmp_path):
    path = save(tmp_path / "i32.tiff", Image.fromarray((RAMP16[:4, :8] * 1000).astype(np.int32)))
    assert Image.open(path).mode == "I"
    msg = assert_refused(path, "I")
    assert "32-bit integers, from a TIFF file" in msg


def test_float_image_in_unit_range_read_as_is(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    path = save(tmp_path / "f.tiff", Image.fromarray(values))
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(rgb(path), grey(values))  # Pillow's convert("RGB") gave 0, 0, 0, 1


@pytest.mark.parametrize("values,words", [([0.0, 2.0], "values in [0, 2]"), ([-0.5, 0.5], "values in [-0.5, 0.5]"),
                                          ([np.nan, 0.5], "non-finite"), ([np.inf, 0.5], "non-finite")])
def test_float_image_outside_unit_range_refused(tmp_path, values, words):
    path = save(tmp_path / "f.tiff", Image.fromarray(np.array([values], dtype=np.float32)))
    assert words in assert_refused(path, "F")


# --------------------------------------------------------------------------- 8-bit modes
def test_bilevel_is_zero_or_one(tmp_path):
    bits = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    path = save(tmp_path / "b.png", Image.fromarray(bits))
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(rgb(path), grey(bits.astype(np.float32)))


@pytest.mark.parametrize("bit_depth", [2, 4])
def test_2_and_4_bit_grey_png_span_the_full_range(tmp_path, bit_depth):
    top = 2 ** bit_depth - 1
    values = np.arange(16).reshape(2, 8) % (top + 1)
    path = write_png(tmp_path / "g.png", values, color_type=0, bit_depth=bit_depth)
    np.testing.assert_array_equal(rgb(path), grey((values * (255 // top)).astype(np.float32) / np.float32(255)))


def test_grey_8bit_is_value_over_255(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = save(tmp_path / "l.png", Image.fromarray(values))
    np.testing.assert_array_equal(rgb(path), grey(values.astype(np.float32) / np.float32(255)))


def test_grey_alpha_drops_alpha(tmp_path):
    la = np.stack([np.arange(0, 256, 16, dtype=np.uint8), np.arange(16, dtype=np.uint8)], -1).reshape(2, 8, 2)
    path = save(tmp_path / "la.png", Image.fromarray(la, mode="LA"))
    np.testing.assert_array_equal(rgb(path), grey(la[..., 0].astype(np.float32) / np.float32(255)))


def test_rgba_drops_alpha(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    arr[0, 0, 3] = 0  # a fully transparent pixel keeps its stored colour
    path = save(tmp_path / "rgba.png", Image.fromarray(arr, mode="RGBA"))
    np.testing.assert_array_equal(rgb(path), arr[..., :3].astype(np.float32) / np.float32(255))


def _palette_image(mode="P"):
    colours = [(0, 0, 0), (200, 100, 50), (10, 20, 30), (255, 255, 255)]
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(idx, mode="L").convert("P")
    im.putpalette([c for rgb_ in colours for c in rgb_] + [0] * (768 - 12))
    expected = np.array([[colours[i] for i in row] for row in idx], dtype=np.float32) / np.float32(255)
    if mode == "PA":
        im = im.convert("PA")
    return im, expected


def test_palette_with_transparency_gives_palette_colours_without_warning(tmp_path):
    im, expected = _palette_image()
    im.info["transparency"] = bytes([0, 128, 255, 255])  # per-entry alpha (a tRNS chunk)
    path = save(tmp_path / "p.png", im)
    with Image.open(path) as check:
        assert check.mode == "P" and isinstance(check.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when such a palette goes straight to RGB
        np.testing.assert_array_equal(rgb(path), expected)


def test_palette_alpha_gives_palette_colours(tmp_path):
    im, expected = _palette_image("PA")
    path = save(tmp_path / "pa.tiff", im)
    assert Image.open(path).mode == "PA"
    np.testing.assert_array_equal(rgb(path), expected)


def test_cmyk_is_multiplicative(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [51, 0, 255, 102], [0, 51, 0, 0]]],
                    dtype=np.uint8)
    path = save(tmp_path / "c.tiff", Image.frombytes("CMYK", (5, 1), cmyk.tobytes()))
    # R = 255 (1 - C)(1 - K): exact for these samples (153 * 204 / 255 = 122.4 -> 122)
    expected = np.array([[[255, 255, 255], [0, 255, 255], [0, 0, 0], [122, 153, 0], [255, 204, 255]]])
    np.testing.assert_array_equal(rgb(path), expected.astype(np.float32) / np.float32(255))


def test_ycbcr_jfif_conversion(tmp_path):
    ycc = np.array([[[0, 128, 128], [100, 128, 128], [255, 128, 128], [100, 90, 200]]], dtype=np.uint8)
    path = save(tmp_path / "y.tiff", Image.frombytes("YCbCr", (4, 1), ycc.tobytes()))
    assert Image.open(path).mode == "YCbCr"
    out = rgb(path) * 255
    np.testing.assert_array_equal(out[0, :3], [[0, 0, 0], [100, 100, 100], [255, 255, 255]])  # grey: R=G=B=Y
    y, cb, cr = 100.0, 90.0 - 128, 200.0 - 128  # JFIF: R = Y + 1.402 Cr, ...
    jfif = [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb]
    np.testing.assert_allclose(out[0, 3], jfif, atol=1.0)


def test_lab_grey_ramp_is_cie_lightness(tmp_path):
    lightness = np.arange(0, 256, 5, dtype=np.uint8)
    lab = np.stack([lightness, np.zeros_like(lightness), np.zeros_like(lightness)], -1)[None]  # a = b = 0
    path = save(tmp_path / "lab.tiff", Image.frombytes("LAB", (len(lightness), 1), lab.tobytes()))
    assert Image.open(path).mode == "LAB"
    big_l = lightness / 255 * 100
    y = np.where(big_l > 8, ((big_l + 16) / 116) ** 3, big_l / 903.3)  # CIE L* -> luminance
    srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)  # sRGB transfer
    np.testing.assert_allclose(rgb(path), grey(srgb[None]), atol=1.5 / 255)


def test_rgbx_hsv_premultiplied_modes_in_memory():
    """Modes no file format reopens in (Pillow saves them in another mode)."""
    def conv(mode, pixels):
        raw = np.array([pixels], dtype=np.uint8)
        return images_module._decoded_values(Image.frombytes(mode, (len(pixels), 1), raw.tobytes()), "mem", None)[0]

    assert conv("RGBX", [(1, 2, 3, 0), (250, 128, 7, 255)]).tolist() == [[1, 2, 3], [250, 128, 7]]
    assert conv("HSV", [(0, 255, 255), (85, 255, 255), (0, 0, 128)]).tolist() == [[255, 0, 0], [0, 255, 0],
                                                                                  [128, 128, 128]]
    # premultiplied alpha: the straight colour (10 / (51 / 255) = 50), like RGBA
    assert conv("RGBa", [(10, 20, 40, 51), (7, 8, 9, 255)]).tolist() == [[50, 100, 200], [7, 8, 9]]
    assert conv("La", [(10, 51), (7, 255)]).tolist() == [[50, 50, 50], [7, 7, 7]]


def test_every_pillow_mode_reads_in_unit_range_or_is_refused_naming_it():
    for mode in Image.MODES:
        im = Image.new(mode, (3, 2))
        try:
            out = images_module._decoded_values(im, "x.png", None)
        except BadImageError as e:
            assert str(e).startswith(f"x.png: image mode {mode!r}"), (mode, str(e))
            continue
        assert out.shape in ((2, 3, 3), (2, 3)), mode
        scaled = out.astype(np.float32) / (255 if out.dtype == np.uint8 else 1)
        assert 0 <= scaled.min() and scaled.max() <= 1, mode
    with pytest.raises(BadImageError, match=r"x\.png: image mode 'BGR;24' is not one acamkd knows"):
        images_module._decoded_values(type("Fake", (), {"mode": "BGR;24"})(), "x.png", None)


# --------------------------------------------------------------------------- 16-bit colour
def _colour16():
    v = RAMP16[::16, ::16].astype(np.uint16)  # (16, 16)
    return np.stack([v, 65535 - v, np.full_like(v, 257 * 7 + 3)], -1)


@pytest.mark.parametrize("alpha", [False, True])
def test_16bit_colour_png_reads_at_8bit_precision(tmp_path, alpha):
    samples = _colour16()
    if alpha:
        samples = np.concatenate([samples, samples[..., :1]], -1)
    path = write_png(tmp_path / "c16.png", samples, color_type=6 if alpha else 2, bit_depth=16)
    out = rgb(path)
    np.testing.assert_array_equal(out, (samples[..., :3] >> 8).astype(np.float32) / np.float32(255))  # high byte
    assert np.abs(out - samples[..., :3] / 65535).max() <= 1 / 257


def test_16bit_grey_alpha_png_reads_at_8bit_precision(tmp_path):
    v = RAMP16[::16, ::16]
    path = write_png(tmp_path / "la16.png", np.stack([v, v[::-1]], -1), color_type=4, bit_depth=16)
    out = rgb(path)
    np.testing.assert_array_equal(out, grey((v >> 8).astype(np.float32) / np.float32(255)))
    assert np.abs(out - grey(v / 65535)).max() <= 1 / 257


def test_16bit_colour_tiff_and_ppm_within_8bit_precision(tmp_path):
    samples = _colour16()
    tiff = write_tiff(tmp_path / "c16.tiff", samples, bits=16, photometric=2)
    ppm = tmp_path / "c16.ppm"
    ppm.write_bytes(b"P6 16 16 65535\n" + samples.astype(">u2").tobytes())
    for path in (tiff, ppm):
        assert np.abs(rgb(path) - samples / 65535).max() <= 1 / 255, path


# --------------------------------------------------------------------------- frames and orientation
@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "PNG"])
def test_multi_frame_file_gives_its_first_frame(tmp_path, fmt):
    frames = [Image.fromarray(np.full((2, 3), v, np.uint8)) for v in (10, 200, 90)]
    path = tmp_path / f"m.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    np.testing.assert_array_equal(rgb(path), grey(np.full((2, 3), 10 / 255, np.float32)))


def test_exif_orientation_is_not_applied(tmp_path):
    values = np.arange(8, dtype=np.uint8).reshape(2, 4) * 30
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": COCO boxes are in the stored frame
    path = save(tmp_path / "o.png", Image.fromarray(values), exif=exif.tobytes())
    assert Image.open(path).getexif().get(0x0112) == 6
    np.testing.assert_array_equal(rgb(path), grey(values.astype(np.float32) / np.float32(255)))


# --------------------------------------------------------------------------- through the datasets
def _coco_with(tmp_path, image):
    (tmp_path / "train2017").mkdir(parents=True)
    (tmp_path / "annotations").mkdir(parents=True)
    image.save(tmp_path / "train2017" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": image.width, "height": image.height}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return tmp_path / "train2017" / "a.png"


def _cityscapes_with(tmp_path, image, label=None):
    img_dir = tmp_path / "leftImg8bit" / "train" / "bonn"
    gt_dir = tmp_path / "gtFine" / "train" / "bonn"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    image.save(img_dir / "bonn_000000_000019_leftImg8bit.png")
    if label is None:
        label = Image.fromarray(np.zeros((image.height, image.width), np.uint8))
    label.save(gt_dir / "bonn_000000_000019_gtFine_labelTrainIds.png")
    return img_dir / "bonn_000000_000019_leftImg8bit.png"


def test_16bit_grey_through_coco_and_cityscapes(tmp_path):
    im = Image.fromarray(RAMP16.astype(np.uint16))
    _coco_with(tmp_path / "coco", im)
    image, _ = CocoDetection(tmp_path / "coco")[0]
    assert float(image.mean()) == pytest.approx(0.5, abs=1e-6)
    _cityscapes_with(tmp_path / "city", im)
    image, _ = CityscapesSegmentation(tmp_path / "city")[0]
    assert float(image.mean()) == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_array_equal(image[0].numpy(), RAMP16.astype(np.float32) / np.float32(65535))


def test_refused_mode_through_the_datasets_error_and_skip(tmp_path):
    im = Image.fromarray(np.full((6, 8), 7, dtype=np.int32))  # 32-bit integers, saved as TIFF content
    root = tmp_path / "city"
    path = _cityscapes_with(root, Image.new("L", (8, 6)))
    im.save(path, format="TIFF")
    with pytest.raises(BadImageError, match=re.escape(f"{path}: image mode 'I'")):
        CityscapesSegmentation(root)[0]
    skipping = CityscapesSegmentation(root, on_bad_image="skip")
    with pytest.raises(BadImageError, match="none of the 1 samples"):
        skipping[0]
    assert "image mode 'I'" in skipping.skipped[str(path)]
    coco_path = _coco_with(tmp_path / "coco", Image.new("L", (8, 6)))
    im.save(coco_path, format="TIFF")
    with pytest.raises(BadImageError, match=re.escape(f"{coco_path}: image mode 'I'")):
        CocoDetection(tmp_path / "coco")[0]


# --------------------------------------------------------------------------- label maps
H, W = 2, 8


def _labels(tmp_path, write):
    """A one-sample Cityscapes folder whose label file is written by ``write(path)``."""
    root = tmp_path / "city"
    _cityscapes_with(root, Image.new("RGB", (W, H)))
    write(root / "gtFine" / "train" / "bonn" / "bonn_000000_000019_gtFine_labelTrainIds.png")
    return CityscapesSegmentation(root)


IDS = np.array([[0, 1, 2, 3, 18, 255, 5, 7], [7, 5, 255, 18, 3, 2, 1, 0]])


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16bit_label_map_gives_its_ids(tmp_path, dtype):
    mode = "I;16" if dtype == "<u2" else "I;16B"
    ds = _labels(tmp_path, lambda p: Image.frombytes(mode, (W, H), IDS.astype(dtype).tobytes()).save(p, "PNG"))
    assert ds[0][1].tolist() == IDS.tolist()


def test_16bit_label_values_above_255_are_listed_not_truncated(tmp_path):
    ids = IDS.copy()
    ids[0, 0] = 256 + 3  # would read as 3 if truncated to 8 bits
    ds = _labels(tmp_path, lambda p: Image.fromarray(ids.astype(np.uint16)).save(p))
    with pytest.raises(ValueError, match=r"label values \[259\] are outside the train ids"):
        ds[0]


def test_16bit_labelids_map_to_train_ids(tmp_path):
    root = tmp_path / "city"
    _cityscapes_with(root, Image.new("RGB", (4, 1)))
    gt = root / "gtFine" / "train" / "bonn"
    (gt / "bonn_000000_000019_gtFine_labelTrainIds.png").unlink()
    Image.fromarray(np.array([[7, 26, 0, 33]], np.uint16)).save(gt / "bonn_000000_000019_gtFine_labelIds.png")
    assert CityscapesSegmentation(root)[0][1].tolist() == [[0, 13, 255, 18]]


def test_bilevel_label_map_gives_0_and_1(tmp_path):
    bits = IDS % 2 == 1
    ds = _labels(tmp_path, lambda p: Image.fromarray(bits).save(p))
    assert ds[0][1].tolist() == bits.astype(int).tolist()


@pytest.mark.parametrize("bit_depth,color_type", [(2, 0), (4, 0), (1, 3), (2, 3), (4, 3)])
def test_low_bit_depth_label_map_gives_its_ids_not_rescaled(tmp_path, bit_depth, color_type):
    ids = np.arange(H * W).reshape(H, W) % (2 ** bit_depth)
    palette = list(range(3 * 2 ** bit_depth)) if color_type == 3 else None
    ds = _labels(tmp_path, lambda p: write_png(p, ids, color_type, bit_depth, palette))
    assert ds[0][1].tolist() == ids.tolist()  # 2/4-bit grey: Pillow gives ids x 85 / x 17, undone


@pytest.mark.parametrize("make,mode", [
    (lambda p: write_png(p, np.stack([IDS, IDS, IDS], -1) * 200, 2, 16), "RGB"),  # 16-bit colour
    (lambda p: Image.fromarray(np.stack([IDS, IDS], -1).astype(np.uint8), mode="LA").save(p), "LA"),
    (lambda p: Image.fromarray(IDS.astype(np.float32)).save(p, "TIFF"), "F"),
])
def test_label_map_of_other_modes_refused_naming_file_and_mode(tmp_path, make, mode):
    ds = _labels(tmp_path, make)
    with pytest.raises(ValueError, match=re.escape(f"{ds.label_files[0]}: ") + f".*mode {mode!r}"):
        ds[0]


@pytest.mark.parametrize("make,words", [
    (lambda p: Image.fromarray(IDS.astype(np.uint8)).save(p, "JPEG", quality=100), "is a JPEG"),
    (lambda p: p.write_bytes(b"P5 8 2 100\n" + np.minimum(IDS, 100).astype(np.uint8).tobytes()), "maxval 100"),
    (lambda p: write_tiff(p, IDS, bits=8, photometric=0), "min-is-white"),
])
def test_label_map_pillow_would_change_is_refused(tmp_path, make, words):
    ds = _labels(tmp_path, make)
    with pytest.raises(ValueError, match=re.escape(f"{ds.label_files[0]}: ") + f".*{words}.*Write the label map"):
        ds[0]


# --------------------------------------------------------------------------- worker errors (6a)
class _Failing(torch.utils.data.Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.error


def _raised_through_a_worker(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1)
    with pytest.raises(Exception) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch gives: the worker's whole traceback
    return info.value


def test_user_message_unwraps_a_worker_bad_image(tmp_path):
    path = _cityscapes_with(tmp_path, Image.new("RGB", (8, 6)))
    path.write_bytes(b"\x89PNG broken")
    err = _raised_through_a_worker(CityscapesSegmentation(tmp_path))
    assert isinstance(err, BadImageError)
    msg = user_message(err)
    assert "Traceback" not in msg and "\n" not in msg, msg
    assert msg.startswith(f"{path}: cannot decode image (")
    assert msg.endswith("or pass on_bad_image='skip'. (in DataLoader worker process 0)"), msg


def test_user_message_keeps_a_multi_line_message_and_unquotes_key_errors():
    err = _raised_through_a_worker(_Failing(ValueError("x.yaml: two problems:\n  a: bad\n  b: worse")))
    assert user_message(err) == "x.yaml: two problems: (in DataLoader worker process 0)\n  a: bad\n  b: worse"
    err = _raised_through_a_worker(_Failing(KeyError("labels")))
    assert isinstance(err, KeyError) and user_message(err) == "labels (in DataLoader worker process 0)"


class _Chained(_Failing):
    """Raises a BadImageError chained to the OSError it explains (``raise ... from e``)."""

    def __getitem__(self, i):
        try:
            raise OSError("inner detail")
        except OSError as e:
            raise BadImageError("a.png: cannot decode image (OSError: inner detail). Re-extract it.") from e


def test_user_message_of_a_chained_error_is_the_raised_one():
    err = _raised_through_a_worker(_Chained(None))
    assert user_message(err) == ("a.png: cannot decode image (OSError: inner detail). Re-extract it. "
                                 "(in DataLoader worker process 0)")


def test_user_message_of_plain_errors():
    assert user_message(ValueError("data.root: not found")) == "data.root: not found"
    assert user_message(KeyError("student")) == "student"  # not "'student'"
    assert user_message(KeyError(3)) == "3"
    assert user_message(RuntimeError()) == "RuntimeError"
    odd = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\nnothing"
    assert user_message(ValueError(odd)) == odd  # an unknown layout is kept whole, never guessed at
