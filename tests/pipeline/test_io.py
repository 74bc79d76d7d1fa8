import re

import numpy as np
import pytest
import tifffile

from pipeline.errors import InputError
from pipeline.images.io import (
    compile_pattern,
    discover_fields,
    parse_channels,
    read_field,
)
from tests.conftest import shared_data

BBBC022 = "fields/bbbc022_plate20585_hoechst_nfme/images"
JUMP = "fields/cellpainting_fovs_cytodataframe/JUMP_plate_BR00117006/images/orig"
NF1 = "fields/cellpainting_fovs_cytodataframe/NF1_cellpainting_data_shrunken/Plate_2_images"


def test_compile_pattern_presets_and_user_regex():
    assert compile_pattern(layout="phenix", pattern=None).match(
        "r02c11f03p01-ch5sk1fk1fl1.tiff"
    )
    regex = compile_pattern(
        layout=None, pattern=r"(?P<well>[A-P]\d+)_(?P<channel>\w+)\.tif"
    )
    assert regex.flags & re.IGNORECASE


@pytest.mark.parametrize(
    ("layout", "pattern", "match"),
    [
        (None, None, "exactly one"),
        ("imagexpress", r"(?P<well>x)", "exactly one"),
        ("operetta2000", None, "unknown"),
        (None, r"(?P<well>[", "not a valid regex"),
        (None, r"(?P<plate>\w+)_(?P<channel>\d)", "needs a named group 'well'"),
    ],
)
def test_compile_pattern_rejects(layout, pattern, match):
    with pytest.raises(ValueError, match=match):
        compile_pattern(layout=layout, pattern=pattern)


def test_parse_channels():
    assert parse_channels("DNA=w1, Actin = w2") == {"DNA": "w1", "Actin": "w2"}
    assert parse_channels(None) is None


@pytest.mark.parametrize(
    ("text", "match"),
    [("DNA", "NAME=TOKEN"), ("DNA=w1,DNA=w2", "twice"), ("A=w1,B=w1", "same token")],
)
def test_parse_channels_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_channels(text)


def test_discover_fields_imagexpress_real_bbbc022():
    """Real ImageXpress names carry a GUID after the channel token."""
    fields = discover_fields(
        shared_data(BBBC022),
        regex=compile_pattern(layout="imagexpress", pattern=None),
        channels={"DNA": "w1"},
    )
    assert len(fields) == 7
    assert set(fields["Metadata_Plate"]) == {"IXMtest"}
    assert list(fields["Metadata_Well"].unique()) == ["A01", "E05", "E07", "E08"]
    row = fields.iloc[-1]
    assert (row["Metadata_Well"], row["Metadata_Site"]) == ("E08", 7)
    assert row["FileName_DNA"].startswith("IXMtest_E08_s7_w1")


def test_discover_fields_ignores_thumbnails(tmp_path):
    for name in ["P1_A01_s1_w1.tif", "P1_A01_s1_w2.tif", "P1_A01_s1_w1_thumb.tif"]:
        tifffile.imwrite(tmp_path / name, np.zeros((4, 4), np.uint16))
    fields = discover_fields(
        tmp_path,
        regex=compile_pattern(layout="imagexpress", pattern=None),
        channels={"DNA": "w1", "Actin": "w2"},
    )
    assert fields.loc[0, "FileName_DNA"] == "P1_A01_s1_w1.tif"


def test_discover_fields_phenix_real_jump_plate_from_folder():
    root = shared_data(JUMP)
    fields = discover_fields(
        root.parent,
        regex=compile_pattern(layout="phenix", pattern=None),
        channels={"AGP": "ch2", "RNA": "ch3", "DNA": "ch5"},
    )
    assert len(fields) == 1
    row = fields.iloc[0]
    assert (row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"]) == (
        "orig",
        "A01",
        1,
    )
    assert row["FileName_DNA"] == "orig/r01c01f01p01-ch5sk1fk1fl1.tiff"


def test_discover_fields_user_regex_real_nf1():
    fields = discover_fields(
        shared_data(NF1),
        regex=compile_pattern(
            layout=None,
            pattern=r"(?P<well>[A-H]\d{1,2})_01_(?P<channel>\d)_(?P<site>\d)_\w+_001\.tif",
        ),
        channels={"DNA": "1", "GFP": "2", "RFP": "3"},
    )
    assert sorted(fields["Metadata_Well"]) == ["B07", "D06", "D07", "F07", "H12"]
    image = read_field(
        [shared_data(NF1) / p for p in fields.filter(like="FileName_").iloc[0]]
    )
    assert image.shape == (3, 904, 1224) and image.dtype == np.uint16


def test_discover_fields_rejects_missing_channel_file(tmp_path):
    for name in ["P1_A01_s1_w1.tif", "P1_A01_s1_w2.tif", "P1_A02_s1_w1.tif"]:
        tifffile.imwrite(tmp_path / name, np.zeros((4, 4), np.uint16))
    with pytest.raises(
        InputError, match=r"P1 well A02 site 1: no file for channel Actin \(token w2\)"
    ):
        discover_fields(
            tmp_path,
            regex=compile_pattern(layout="imagexpress", pattern=None),
            channels={"DNA": "w1", "Actin": "w2"},
        )


def test_discover_fields_rejects_nothing_matching(tmp_path):
    tifffile.imwrite(tmp_path / "random.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(InputError, match="no file name matches.*random.tif"):
        discover_fields(
            tmp_path,
            regex=compile_pattern(layout="phenix", pattern=None),
            channels={"DNA": "ch1"},
        )


def test_discover_fields_rejects_unmapped_tokens(tmp_path):
    tifffile.imwrite(tmp_path / "P1_A01_s1_w1.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(InputError, match="files have tokens w1"):
        discover_fields(
            tmp_path,
            regex=compile_pattern(layout="imagexpress", pattern=None),
            channels={"DNA": "w5"},
        )


def test_discover_fields_rejects_z_stacks(tmp_path):
    for plane in (1, 2):
        tifffile.imwrite(
            tmp_path / f"r01c01f01p0{plane}-ch1sk1fk1fl1.tiff",
            np.zeros((4, 4), np.uint16),
        )
    with pytest.raises(
        InputError, match="both .* match; make the pattern more specific"
    ):
        discover_fields(
            tmp_path,
            regex=compile_pattern(layout="phenix", pattern=None),
            channels={"DNA": "ch1"},
        )


def test_discover_fields_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_fields(
            tmp_path / "x",
            regex=compile_pattern(layout="phenix", pattern=None),
            channels={"DNA": "ch1"},
        )


def test_read_field_real_lzw_jump_channels():
    root = shared_data(JUMP)
    image = read_field([root / f"r01c01f01p01-ch{c}sk1fk1fl1.tiff" for c in (5, 2, 3)])
    assert image.shape == (3, 1080, 1080) and image.dtype == np.uint16
    assert image[0].max() > image[0].min()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_read_field_multichannel_file_and_dtypes(tmp_path, dtype):
    data = (np.arange(3 * 8 * 10).reshape(3, 8, 10) % 200).astype(dtype)
    tifffile.imwrite(tmp_path / "A01_s1.ome.tif", data, metadata={"axes": "CYX"})
    path = tmp_path / "A01_s1.ome.tif"
    image = read_field([path, path], channel_indexes=[2, 0])
    assert image.dtype == dtype
    np.testing.assert_array_equal(image, data[[2, 0]])


def test_read_field_rgb_samples_as_channels(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    image = read_field([tmp_path / "rgb.tif"], channel_indexes=[1])
    np.testing.assert_array_equal(image[0], data[..., 1])


def test_read_field_rejects_truncated_tiff(tmp_path):
    source = shared_data(JUMP) / "r01c01f01p01-ch5sk1fk1fl1.tiff"
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    with pytest.raises(ValueError, match="broken.tiff: cannot read the TIFF"):
        read_field([broken])


def test_read_field_rejects_not_a_tiff(tmp_path):
    path = tmp_path / "x.tif"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"x.tif: cannot read the TIFF .*not a TIFF"):
        read_field([path])


def test_read_field_rejects_shape_mismatch(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 5), np.uint16))
    with pytest.raises(
        ValueError, match=r"differ in size.*a.tif: \(4, 4\).*b.tif: \(4, 5\)"
    ):
        read_field([tmp_path / "a.tif", tmp_path / "b.tif"])


def test_read_field_names_mixed_bit_depths(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"differ in bit depth.*a.tif: \(4, 4\) uint16.*uint8.*all uint16",
    ):
        read_field([tmp_path / "a.tif", tmp_path / "b.tif"])


def test_read_field_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.tif"):
        read_field([tmp_path / "gone.tif"])


def test_read_field_rejects_stack_as_single_plane(tmp_path):
    tifffile.imwrite(
        tmp_path / "stack.tif", np.zeros((3, 4, 4), np.uint16), metadata={"axes": "ZYX"}
    )
    with pytest.raises(ValueError, match="expected one 2-D plane"):
        read_field([tmp_path / "stack.tif"])


def test_read_field_rejects_bad_channel_index(tmp_path):
    tifffile.imwrite(
        tmp_path / "m.tif", np.zeros((2, 4, 4), np.uint16), metadata={"axes": "CYX"}
    )
    with pytest.raises(
        ValueError, match="channel index 5 does not exist; the file has 2"
    ):
        read_field([tmp_path / "m.tif"], channel_indexes=[5])


def test_read_field_rejects_empty_paths():
    with pytest.raises(ValueError, match="paths is empty"):
        read_field([])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("PLATE-1_B03_s2.ome.tif", ("PLATE-1", "B03", "2")),
        ("B03.tif", (None, "B03", None)),
        ("my_plate_C11_s10.tiff", ("my_plate", "C11", "10")),
    ],
)
def test_multichannel_layout_parses_plate_well_site(name, expected):
    match = compile_pattern(layout="multichannel", pattern=None).match(name)
    assert (match["plate"], match["well"], match["site"]) == expected
