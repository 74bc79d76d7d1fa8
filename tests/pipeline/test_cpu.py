"""CPU flags and the warning for bfloat16 networks on CPUs that emulate it."""

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import tifffile

from pipeline import cpu
from pipeline.cpu import cpu_fields, cpu_flags, emulated_bfloat16_warning
from pipeline.run import segment_files
from tests.conftest import make_field

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx2 avx512f

processor\t: 1
flags\t\t: fpu avx512_bf16
"""


def _warnings(caplog):
    """The beginnings of `pipeline.cpu`'s warnings, up to "this machine"."""
    return [
        r.getMessage().split("'s CPU")[0]
        for r in caplog.records
        if r.name == cpu.__name__
    ]


def test_cpu_flags_of_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_flags(path) == {"fpu", "sse2", "avx2", "avx512f"}
    assert cpu_fields(path) == {
        "processor": "0",
        "model name": "Some CPU",
        "flags": "fpu sse2 avx2 avx512f",
    }
    assert cpu_fields(tmp_path / "missing") is None
    path.write_text("processor\t: 0\nmodel name\t: no flags here\n")
    assert cpu_flags(path) is None
    assert cpu_flags(tmp_path / "missing") is None
    if Path("/proc/cpuinfo").exists():  # Linux; ARM CPUs list "Features": None
        assert cpu_flags() is None or len(cpu_flags()) > 0


@pytest.mark.parametrize(
    ("device", "precision", "flags", "warns"),
    [
        ("cpu", "bfloat16", frozenset({"avx2", "avx512f"}), True),
        ("cpu", "bfloat16", frozenset(), True),
        ("cpu", "bfloat16", frozenset({"avx512_bf16"}), False),
        ("cpu", "bfloat16", frozenset({"amx_bf16", "amx_tile"}), False),
        ("cpu", "bfloat16", None, False),  # unknown CPU: no guess
        ("cpu", "float32", frozenset({"avx2"}), False),
        ("cpu", None, frozenset({"avx2"}), False),  # float32 on CPUs
        ("cuda", "bfloat16", frozenset({"avx2"}), False),
    ],
)
def test_emulated_bfloat16_warning(device, precision, flags, warns):
    message = emulated_bfloat16_warning("segment.precision", device, precision, flags)
    assert (message is not None) == warns
    if warns:
        assert message.startswith('segment.precision is "bfloat16"')
        assert "avx512_bf16 or amx_bf16" in message and "float32" in message


def test_segment_files_warns_of_emulated_bfloat16(tmp_path, monkeypatch, caplog):
    image, _ = make_field(3, shape=(64, 64), n_channels=1)
    path = tmp_path / "field.tif"
    tifffile.imwrite(path, image[0])
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.WARNING, logger="pipeline.cpu"):
        segment_files([path], tmp_path / "f32", segment={"precision": "float32"})
        assert not _warnings(caplog)
        table = segment_files(
            [path], tmp_path / "bf16", segment={"precision": "bfloat16"}
        )
    assert table["n_nuclei"].iloc[0] == 3
    assert _warnings(caplog) == [
        'precision (--segmenter-precision) is "bfloat16" but this machine'
    ]


def test_embed_command_warns_of_emulated_bfloat16(tmp_path, monkeypatch, caplog):
    from pipeline.cli import main

    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level(logging.WARNING, logger="pipeline.cpu"):
        code = main(["embed", "--db", url, "--run", "7", "--precision", "bfloat16",
                     "--device", "cpu"])  # fmt: skip
    assert code != 0  # no such store
    assert _warnings(caplog) == [
        'embed.precision (--precision) is "bfloat16" but this machine'
    ]


def test_run_experiment_warns_of_emulated_bfloat16(tmp_path, monkeypatch, caplog):
    from pipeline.config import config_from_dict
    from pipeline.errors import InputError
    from pipeline.run import run_experiment

    config = config_from_dict({"segment": {"precision": "bfloat16"}})
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.cpu"),
        pytest.raises(InputError),  # no images: stops before any write
    ):
        run_experiment(
            tmp_path / "missing", tmp_path / "platemap.csv", config=config,
            db_url=f"sqlite:///{tmp_path / 'store.db'}",
        )  # fmt: skip
    assert _warnings(caplog) == ['segment.precision is "bfloat16" but this machine']


def test_run_on_a_cluster_warns_of_the_embedding_only(
    demo_plate, tmp_path, monkeypatch, caplog
):
    """With an external scheduler the workers' CPUs segment (not checked here); the
    embedding runs in this process, so its precision is checked before any field."""
    from pipeline.config import load_config
    from pipeline.errors import InputError
    from pipeline.run import run_experiment
    from tests.conftest import free_port

    config = load_config(demo_plate["config"])
    config = replace(
        config,
        segment=replace(config.segment, precision="bfloat16"),
        embed=replace(config.embed, enabled=True, precision="bfloat16"),
        execution=replace(config.execution, scheduler=f"tcp://127.0.0.1:{free_port()}"),
    )
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr("models.embed.embed_device", lambda: "cpu")  # GPU or not
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.cpu"),
        pytest.raises(InputError, match="cannot reach the Dask scheduler"),
    ):
        run_experiment(
            demo_plate["images"], demo_plate["platemap"], config=config,
            db_url=f"sqlite:///{tmp_path / 'store.db'}",
        )  # fmt: skip
    assert _warnings(caplog) == ['embed.precision is "bfloat16" but this machine']
