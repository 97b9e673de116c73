"""The one image decoder (issue 31): images read as a viewer shows them, bad ones refused by name,
the same one-line message with or without DataLoader workers, and the "squash" fit."""

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from clipguard import ClipguardError
from clipguard.cli import main
from clipguard.data import load_image_folder, load_webdataset
from clipguard.data.images import decode_image
from clipguard.data.pairs import load_caption_csv, load_images_under
from clipguard.data.stream import one_line_errors
from conftest import caption_csv, folder_of_test_images

RNG = np.random.default_rng(0)


def png_file(path, width: int, height: int, depth: int, colour_type: int, rows: bytes) -> None:
    """A PNG written chunk by chunk: header, the filtered ``rows`` compressed, end."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def png16(path, pixels: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG (PIL writes no 16-bit RGB): uint16 (H, W) grey (type 0) or (H, W, 3) RGB (type 2)."""
    h, w = pixels.shape[:2]
    png_file(path, w, h, 16, colour_type, b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h)))


def png_header(path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (8-bit grey) but holds one row: only its header is read."""
    png_file(path, width, height, 8, 0, bytes(width + 1))


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **{"quality": 95, **save})
    return buffer.getvalue()


@pytest.mark.parametrize("colour", ["grey", "rgb"])
def test_a_16_bit_png_reads_as_its_8_bit_copy(tmp_path, colour):
    """Issue 31 item 5: 16-bit PNGs were read as a binary image (CA 64 % instead of 92 %)."""
    shape = (24, 32) if colour == "grey" else (24, 32, 3)
    pixels = RNG.integers(0, 65536, shape).astype(np.uint16)
    if colour == "grey":
        Image.fromarray(pixels).save(tmp_path / "deep.png")  # PIL writes mode I;16 as a 16-bit grey PNG
        assert Image.open(tmp_path / "deep.png").mode == "I;16"
    else:
        png16(tmp_path / "deep.png", pixels, colour_type=2)
    Image.fromarray(np.rint(pixels / 257).astype(np.uint8)).save(tmp_path / "copy.png")
    deep, copy = decode_image(tmp_path / "deep.png", 16), decode_image(tmp_path / "copy.png", 16)
    assert (deep.int() - copy.int()).abs().max() <= 1  # within 1/255
    assert len(torch.unique(deep)) > 100  # not a binary image


@pytest.mark.parametrize("mode", ["I;16B", "I", "F"])
def test_16_bit_and_float_modes_read_on_their_scale(tmp_path, mode):
    """Big-endian 16-bit, 32-bit integer (older PIL's 16-bit PNG) and float TIFFs: v/65535 or v in [0, 1]."""
    unit = RNG.random((16, 16))
    arrays = {"I;16B": (unit * 65535).round().astype(">u2"), "I": (unit * 65535).round().astype(np.int32),
              "F": unit.astype(np.float32)}
    image = Image.fromarray(arrays[mode])
    assert image.mode == mode
    image.save(tmp_path / "deep.tif")
    Image.fromarray(np.rint(unit * 255).astype(np.uint8)).save(tmp_path / "copy.png")
    deep, copy = decode_image(tmp_path / "deep.tif", 16), decode_image(tmp_path / "copy.png", 16)
    assert (deep.int() - copy.int()).abs().max() <= 1


def test_float_pixels_outside_unit_range_are_refused_by_name(tmp_path):
    Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ClipguardError, match=r"hdr\.tif: float pixels outside \[0, 1\]"):
        decode_image(tmp_path / "hdr.tif", 8)


def test_transparency_is_composited_over_white(tmp_path):
    """Palette with a transparent index, palette without, LA and RGBA: what a viewer shows on white."""
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))  # left half index 1 (green), right half index 0 (red)
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "keyed.png", transparency=0)  # index 0 transparent
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "clear.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "half.png")

    def pixel(name, x=6):
        return decode_image(tmp_path / name, 8, fit="squash")[:, 4, x].tolist()

    assert pixel("opaque.png") == [200, 10, 10] and pixel("opaque.png", x=1) == [10, 200, 10]
    assert pixel("keyed.png") == [255, 255, 255] and pixel("keyed.png", x=1) == [10, 200, 10]
    assert pixel("clear.png") == [255, 255, 255]  # was black: RGBA/LA -> RGB drops the alpha
    assert pixel("half.png") == [255, 127, 127]


def test_cmyk_and_lab_images_read_in_their_colours(tmp_path):
    (tmp_path / "cmyk.jpg").write_bytes(jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0))))  # red ink
    Image.new("LAB", (16, 16), (138, 208, 195)).save(tmp_path / "lab.tif")  # L* 54, a* 80, b* 67: red
    for name in ("cmyk.jpg", "lab.tif"):
        red = decode_image(tmp_path / name, 8).float().mean((1, 2))
        assert red[0] > 240 and red[1] < 15 and red[2] < 15, name


def test_exif_orientation_is_applied(tmp_path):
    """A 40x20 landscape JPEG (left half black, right half white) tagged 'rotate 90 clockwise' reads as
    the 20x40 portrait a viewer shows: black on top."""
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is shown rotated 90 degrees clockwise
    (tmp_path / "turned.jpg").write_bytes(jpeg_bytes(Image.fromarray(stored).convert("RGB"), exif=exif.tobytes()))
    shown = decode_image(tmp_path / "turned.jpg", 16, fit="squash").float()  # (3, 16, 16) of the portrait frame
    assert shown[:, :6].mean() < 30 and shown[:, 10:].mean() > 225
    raw = Image.open(tmp_path / "turned.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    expected = torch.from_numpy(np.asarray(raw.resize((16, 16), Image.BICUBIC)).copy()).permute(2, 0, 1)
    assert torch.equal(shown.to(torch.uint8), expected)


def test_a_truncated_jpeg_is_refused_by_name(tmp_path):
    whole = jpeg_bytes(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (tmp_path / "half.jpg").write_bytes(whole[: len(whole) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ClipguardError, match=r"cannot read image .*half\.jpg .*truncated.*remove or replace"):
        decode_image(tmp_path / "half.jpg", 16)


def test_a_jpeg_with_a_garbled_scan_is_refused_by_name(tmp_path):
    """PIL decodes it into a plausible picture (libjpeg only warns, PIL drops the warning)."""
    raw = bytearray(jpeg_bytes(Image.fromarray(RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8)), quality=90))
    start = raw.find(b"\xff\xda") + 20
    raw[start: start + 400] = bytes((b * 7 + 3) % 255 for b in range(400))  # the battery's corruption
    (tmp_path / "garbled.jpg").write_bytes(bytes(raw))
    with Image.open(tmp_path / "garbled.jpg") as im:
        im.load()  # PIL alone accepts it
    with pytest.raises(ClipguardError, match=r"garbled\.jpg is a damaged JPEG \(Corrupt JPEG data: .*\); remove or replace"):
        decode_image(tmp_path / "garbled.jpg", 16)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("options", [dict(), dict(progressive=True, optimize=True), dict(restart_marker_blocks=2),
                                     dict(subsampling=0, quality=95)])
def test_valid_jpegs_pass_the_damage_check(options, mode):
    from clipguard.data.images import jpeg_damage

    image = Image.fromarray(RNG.integers(0, 256, (61, 83, 3), dtype=np.uint8)).convert(mode)
    data = jpeg_bytes(image, **options)
    assert jpeg_damage(data) is None
    assert decode_image(data, 16).shape == (3, 16, 16)


def test_no_dependency_lets_pil_accept_truncated_images():
    """clipguard and what it imports leave PIL strict (LOAD_TRUNCATED_IMAGES would fill a cut file with grey)."""
    import open_clip  # noqa: F401
    import timm  # noqa: F401
    import webdataset  # noqa: F401

    import clipguard.cli  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS == 89_478_485


def test_an_image_over_the_real_pixel_limit_is_refused_by_name(tmp_path, recwarn):
    """PIL's real limits: 15000 x 15000 (over twice MAX_IMAGE_PIXELS: PIL's DecompressionBombError) and
    10000 x 10000 (over it: only a warning in PIL) are both refused, naming the file, before any decoding."""
    png_header(tmp_path / "huge.png", 15000, 15000)
    with pytest.raises(ClipguardError, match=r"image .*huge\.png is 225,000,000 pixels, over PIL's decompression"):
        decode_image(tmp_path / "huge.png", 16)
    png_header(tmp_path / "big.png", 10000, 10000)
    with pytest.raises(ClipguardError, match=r"image .*big\.png is 10000x10000 = 100,000,000 pixels.*downscale"):
        decode_image(tmp_path / "big.png", 16)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_lowered_pixel_limit_is_the_one_applied(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "warned.png")  # 1,600 pixels: over the limit
    Image.new("RGB", (50, 50)).save(tmp_path / "bomb.png")  # 2,500: over twice the limit
    Image.new("RGB", (30, 30)).save(tmp_path / "fine.png")
    for name in ("warned.png", "bomb.png"):
        with pytest.raises(ClipguardError, match=rf"{name} is .*over PIL's decompression-bomb limit \(1,000 pixels\)"):
            decode_image(tmp_path / name, 8)
    assert decode_image(tmp_path / "fine.png", 8).shape == (3, 8, 8)


def test_a_bad_webdataset_member_is_refused_by_shard_and_key(tmp_path):
    good = jpeg_bytes(Image.new("RGB", (16, 16), (0, 128, 0)))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for key, image in (("good", good), ("broken", good[: len(good) // 2])):
            for ext, data in (("jpg", image), ("txt", f"a photo of {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    corpus = load_webdataset(str(tmp_path / "shard.tar"), size=8)
    broken = corpus.keys.index("broken")
    assert (corpus.decode(1 - broken)[:, 4, 4].int() - torch.tensor([0, 128, 0])).abs().max() <= 2
    with pytest.raises(ClipguardError, match=r"cannot read image broken in .*shard\.tar .*replace that sample"):
        corpus.decode(broken)


def test_a_worker_error_reads_as_without_workers():
    """A ClipguardError raised in a DataLoader worker (any loader: evaluation's or the training loop's)
    comes back with its own one-line message, not torch's 20-line traceback."""
    from torch.utils.data import DataLoader

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise ClipguardError("cannot read image /data/x.png (broken); remove or replace the file")

    for workers in (0, 1):
        with pytest.raises(ClipguardError) as err:
            list(one_line_errors(DataLoader(Failing(), batch_size=1, num_workers=workers)))
        assert str(err.value) == "cannot read image /data/x.png (broken); remove or replace the file"


def one_error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit 2 and one ``clipguard: error:`` line, no traceback; return that line's message."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("clipguard: error: ") == 1, err
    return err.partition("clipguard: error: ")[2].partition("\n")[0]  # after a progress bar's \r


@pytest.mark.parametrize("command", ["evaluate", "cleanclip"])
def test_a_corrupt_image_gives_the_same_one_line_error_with_and_without_workers(tmp_path, model_dir, capsys,
                                                                                command):
    """Issue 31: with the default workers an unreadable image printed about 20 lines of DataLoader traceback.
    Evaluation decodes in iterate_batches' loader, a fine-tune in the training loop's."""
    if command == "evaluate":
        bad = folder_of_test_images(tmp_path / "data", 2) / "bag" / "001.png"
        argv = ["evaluate", "--model", str(model_dir), "--dataset", str(tmp_path / "data"), "--device", "cpu"]
    else:
        bad = caption_csv(tmp_path / "pairs", 32).parent / "images" / "00007.png"
        argv = ["defend", "--method", "cleanclip", "--model", str(model_dir), "--captions",
                f"csv:{tmp_path / 'pairs' / 'pairs.csv'}", "--set", "pairs=32", "--set", "batch_size=16", "--set",
                "epochs=1", "--device", "cpu", "--out", str(tmp_path / "cleaned")]
    bad.write_bytes(bad.read_bytes()[:60])  # a PNG cut short
    with_workers, without = (one_error_line(capsys, argv + ["--workers", workers]) for workers in ("2", "0"))
    assert str(bad) in with_workers and "remove or replace the file" in with_workers
    assert with_workers == without


def test_squash_fits_the_full_frame_and_crop_the_centre(tmp_path):
    """A 60x20 frame of three bands (red | green | blue): "crop" keeps the green centre, "squash" all three,
    for folders, caption CSVs, unlabelled pools and webdataset members alike."""
    bands = np.zeros((20, 60, 3), dtype=np.uint8)
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255
    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        Image.fromarray(bands).save(tmp_path / "folder" / cls / "bands.png")
    (tmp_path / "pairs.csv").write_text("filepath,caption\nfolder/a/bands.png,three bands\n")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for ext, data in (("png", (tmp_path / "folder/a/bands.png").read_bytes()), ("txt", b"three bands")):
            info = tarfile.TarInfo(f"bands.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sets = [load_image_folder(tmp_path / "folder", 12), load_caption_csv(tmp_path / "pairs.csv", 12, workers=0),
            load_images_under(tmp_path / "folder", 12, workers=0), load_webdataset(str(tmp_path / "shard.tar"), 12)]
    for images in sets:
        crop = images.float_images(torch.tensor([0]))[0]
        squashed = images.fitted("squash")
        full = squashed.float_images(torch.tensor([0]))[0]
        assert images.fit == "crop" and squashed.fit == "squash" and len(squashed) == len(images)
        assert crop[1].mean() > 0.95 and crop[0].mean() < 0.05  # the green centre only
        left, middle, right = full[:, :, 1], full[:, :, 6], full[:, :, 10]  # (3, 12) columns
        assert left[0].mean() > 0.9 and middle[1].mean() > 0.9 and right[2].mean() > 0.9
        assert squashed.subset(torch.tensor([0])).fit == "squash"
    with pytest.raises(ValueError, match="fit must be one of"):
        sets[0].fitted("stretch")
