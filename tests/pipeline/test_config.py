import inspect
from dataclasses import asdict, fields

import pytest

from pipeline.cells.segment import segment_field
from pipeline.config import (
    ExecutionConfig,
    InputConfig,
    MeasureConfig,
    RunConfig,
    SegmentConfig,
    analysis_key,
    config_from_dict,
    dump_config,
    load_config,
    with_overrides,
)
from pipeline.errors import InputError
from pipeline.measure.features import measure_cells


def test_segment_config_matches_segment_field_keywords():
    keywords = {
        name: p.default
        for name, p in inspect.signature(segment_field).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    assert keywords == asdict(SegmentConfig())


def test_measure_cells_takes_the_measure_config():
    options = inspect.signature(measure_cells).parameters["options"]
    assert "MeasureConfig" in str(options.annotation)


def test_dump_and_load_roundtrip(tmp_path):
    config = RunConfig(
        input=InputConfig(
            layout=None,
            pattern=r"(?P<well>\w+)_(?P<channel>\d)\.tif",
            channels={"DNA": "1", "Actin": "2"},
        ),
        segment=SegmentConfig(nucleus_diameter_px=12, method="classical"),
        measure=MeasureConfig(texture_scales=(2, 4)),
        execution=ExecutionConfig(n_workers=2),
    )
    path = tmp_path / "run.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_load_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[segment]\nsigma = 2\n[segmentation]\n")
    with pytest.raises(InputError) as info:
        load_config(path)
    assert "unknown section [segmentation]" in str(info.value)
    assert (
        "[segment] has unknown key 'sigma'; valid: method, nucleus_diameter_px"
        in str(info.value)
    )


def test_load_config_rejects_bad_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[segment\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(path)


def test_load_config_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.toml")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"segment": {"seed_fraction": 0}}, r"seed_fraction = 0 must lie in"),
        ({"segment": {"edge_fraction": 1}}, r"edge_fraction = 1 must lie in"),
        (
            {"segment": {"hysteresis_fraction": 0.7}},
            r"hysteresis_fraction was retired: .* seed_fraction",
        ),
        ({"segment": {"method": "otsu"}}, "segment.method = 'otsu' is unknown"),
        (
            {"segment": {"method": "classical", "weights": "my.pt"}},
            "segment.weights = 'my.pt' is for method = \"unet\" only",
        ),
        ({"measure": {"texture_levels": 1}}, "texture_levels = 1 must lie in"),
        ({"qc": {"max_saturated_frac": 2}}, "max_saturated_frac = 2 must lie in"),
        (
            {"input": {"channels": {"DNA": "w1"}, "cytoplasm_channel": "Actin"}},
            "cytoplasm_channel 'Actin' is not among",
        ),
        ({"execution": {"max_failed_fields_frac": 2}}, "max_failed_fields_frac"),
        (
            {"input": {"channels": {"Hoechst": "w1"}}},
            "nuclei_channel 'DNA' is not among",
        ),
        (
            {"input": {"layout": "phenix", "pattern": "x"}},
            "exactly one of layout and pattern",
        ),
        (
            {"embed": {"layer": "fc"}},
            "embed.layer = 'fc' must be 'pooled' or 'blocks.K'",
        ),
        ({"embed": {"strategy": "grey"}}, "embed.strategy = 'grey' is unknown"),
        ({"embed": {"aggregate": "max"}}, "embed.aggregate = 'max' is unknown"),
        ({"embed": {"input_size": 2}}, "embed.input_size = 2 must lie in"),
        ({"embed": {"colour": 1}}, "unknown key 'colour'"),
        ({"profile": {"whiten": "pca"}}, "profile.whiten = 'pca' is unknown"),
        ({"profile": {"whiten_scope": "well"}}, "profile.whiten_scope = 'well'"),
        ({"hits": {"fdr": 0}}, r"hits.fdr = 0 must lie in \(0, 1\)"),
        (
            {"hits": {"toxicity_threshold": 2}},
            "hits.toxicity_threshold = 2 must lie in",
        ),
        ({"hits": {"q": 0.1}}, "unknown key 'q'"),
        ({"qc": {"focus_mad": "5"}}, r"\[qc\] focus_mad = '5' must be a number"),
        ({"execution": {"n_workers": 2.5}}, "n_workers = 2.5 must be a whole number"),
        ({"illumination": {"enabled": "yes"}}, "enabled = 'yes' must be true or false"),
        ({"input": {"channels": ["w1"]}}, "channels = \\['w1'\\] must be a table"),
        ({"embed": {"percentiles": 3}}, "percentiles = 3 must be a list"),
        ({"segment": {"method": 3}}, "method = 3 must be text"),
    ],
)
def test_config_from_dict_rejects_bad_values(data, match):
    with pytest.raises(InputError, match=match):
        config_from_dict(data)


def test_analysis_key_ignores_execution_and_qc_only():
    base = RunConfig()
    assert analysis_key(base) == analysis_key(
        with_overrides(base, execution={"n_workers": 7}, qc={"focus_mad": 2.0},
                       embed={"enabled": True, "layer": "pooled"},
                       profile={"whiten": "controls"}, hits={"fdr": 0.1})
    )  # fmt: skip
    for section, values in (
        ("segment", {"nucleus_diameter_px": 3}),
        ("illumination", {"enabled": False}),
        ("measure", {"radial_bins": 2}),
    ):
        changed = with_overrides(base, **{section: values})
        assert analysis_key(base) != analysis_key(changed)


def test_with_overrides_ignores_none_and_rejects_unknown_section():
    config = with_overrides(
        RunConfig(), execution={"n_workers": None, "scheduler": "tcp://x:1"}
    )
    assert (
        config.execution.n_workers is None and config.execution.scheduler == "tcp://x:1"
    )
    with pytest.raises(ValueError, match="unknown section"):
        with_overrides(RunConfig(), exec={"n_workers": 1})


def test_every_section_is_a_frozen_dataclass():
    for field in fields(RunConfig):
        section = getattr(RunConfig(), field.name)
        with pytest.raises(AttributeError):
            section.__setattr__(fields(section)[0].name, None)


def test_config_from_dict_drops_retired_keys_of_stored_runs():
    stored = {"segment": {"method": "classical", "hysteresis_fraction": 0.7}}
    config = config_from_dict(stored, source="run 1", stored=True)
    assert config.segment == SegmentConfig(method="classical")


def test_embed_and_profile_sections_roundtrip(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[embed]\nenabled = true\nlayer = "blocks.3"\ninput_size = 96\n'
        'percentiles = [2, 98]\n[profile]\nwhiten = "controls"\n'
    )
    config = load_config(path)
    assert config.embed.enabled and config.embed.layer == "blocks.3"
    assert config.embed.percentiles == (2, 98) and config.embed.input_size == 96
    assert config.profile.whiten == "controls" and config.profile.whiten_scope == "all"
    again = tmp_path / "again.toml"
    again.write_text(dump_config(config))
    assert load_config(again) == config
    native = with_overrides(config, embed={"input_size": 0})  # 0: no resize
    assert native.embed.input_size is None
    again.write_text(dump_config(native))
    assert load_config(again).embed.input_size is None  # not back to the default


def test_segment_device_is_checked_and_keys_only_gpu_runs():
    from pipeline.config import analysis_key

    default = RunConfig()
    assert default.segment.device == "cpu"
    # the key of a CPU run is the one it had before the option existed
    assert analysis_key(default) == "fb1bbfe4f3a54f59"
    gpu = with_overrides(default, segment={"device": "cuda"})
    assert analysis_key(gpu) != analysis_key(default)  # bfloat16 cells differ
    lean = with_overrides(default, measure={"cytoplasm": False})
    assert analysis_key(lean) != analysis_key(default)  # fewer features
    with pytest.raises(InputError, match="segment.device = 'tpu' is unknown"):
        with_overrides(default, segment={"device": "tpu"})
    with pytest.raises(InputError, match='runs the "unet" segmenter only'):
        with_overrides(default, segment={"device": "cuda", "method": "classical"})


def test_segment_precision_is_checked_and_keys_only_non_default_arithmetic(tmp_path):
    from pipeline.config import analysis_key

    default = RunConfig()
    assert default.segment.precision is None
    cpu_float32 = with_overrides(default, segment={"precision": "float32"})
    assert analysis_key(cpu_float32) == analysis_key(default) == "fb1bbfe4f3a54f59"
    cpu_bfloat16 = with_overrides(default, segment={"precision": "bfloat16"})
    assert analysis_key(cpu_bfloat16) != analysis_key(default)  # its cells differ
    gpu = with_overrides(default, segment={"device": "cuda"})
    gpu_bfloat16 = with_overrides(gpu, segment={"precision": "bfloat16"})
    gpu_float32 = with_overrides(gpu, segment={"precision": "float32"})
    assert analysis_key(gpu_bfloat16) == analysis_key(gpu)
    assert len({analysis_key(c) for c in (gpu, gpu_float32, cpu_bfloat16)}) == 3
    with pytest.raises(InputError, match="segment.precision = 'float16' is unknown"):
        with_overrides(default, segment={"precision": "float16"})
    with pytest.raises(InputError, match='for method = "unet" only'):
        with_overrides(
            default, segment={"precision": "bfloat16", "method": "classical"}
        )
    with pytest.raises(InputError, match="segment.method = 'otsu' is unknown"):
        with_overrides(default, segment={"precision": "bfloat16", "method": "otsu"})
    both = with_overrides(cpu_bfloat16, embed={"precision": "bfloat16"})
    assert analysis_key(both) == analysis_key(cpu_bfloat16)  # embeddings: no cells
    path = tmp_path / "run.toml"  # the choices survive the saved config
    path.write_text(dump_config(both))
    assert path.read_text().count('precision = "bfloat16"') == 2
    assert load_config(path) == both
    assert analysis_key(load_config(path)) == analysis_key(cpu_bfloat16)


def test_a_cuda_segmenter_without_a_gpu_names_the_fix():
    import numpy as np
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test is about machines without one")
    plane = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    with pytest.raises(InputError, match="sees no CUDA device"):
        segment_field(plane, method="unet", device="cuda")  # on a worker


def test_a_local_cuda_run_without_a_gpu_is_refused_before_anything_is_written(
    demo_plate, tmp_path
):
    import torch

    from pipeline.images.demo import CHANNELS
    from pipeline.run import run_experiment

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test is about machines without one")
    config = with_overrides(
        config_from_dict({"input": {"layout": "imagexpress", "channels": CHANNELS}}),
        segment={"device": "cuda"},
    )
    with pytest.raises(InputError, match="this machine has no CUDA device"):
        run_experiment(demo_plate["images"], demo_plate["platemap"], config=config,
                       db_url=f"sqlite:///{tmp_path}/s.db")  # fmt: skip
    assert not (tmp_path / "s.db").exists()


def test_embed_batch_size_is_the_devices_unless_set(tmp_path):
    from pipeline.config import EmbedConfig, embed_batch_size

    assert EmbedConfig().batch_size is None
    five, three, stem = 5 * 64 * 64, 3 * 64 * 64, 64 * 64  # default recipe; stem
    assert embed_batch_size("cpu", pixels_per_crop=five) == 8
    assert embed_batch_size("cpu", pixels_per_crop=three) == 13
    assert embed_batch_size("cpu", pixels_per_crop=stem) == 40
    assert embed_batch_size("cpu", pixels_per_crop=5 * 96 * 96) == 4
    assert embed_batch_size("cpu", pixels_per_crop=10**6) == 1  # at least one
    assert embed_batch_size("cuda", pixels_per_crop=stem) == 32
    assert embed_batch_size("mps", pixels_per_crop=five) == 8
    assert embed_batch_size("cuda", 5, pixels_per_crop=five) == 5
    with pytest.raises(ValueError, match="must be >= 1"):
        embed_batch_size("cpu", 0, pixels_per_crop=five)
    with pytest.raises(ValueError, match="pixels_per_crop 0 must be >= 1"):
        embed_batch_size("cpu", pixels_per_crop=0)
    assert EmbedConfig(batch_size=0).batch_size is None  # TOML's "the default"
    with pytest.raises(InputError, match="embed.batch_size = -2"):
        EmbedConfig(batch_size=-2)
    path = tmp_path / "run.toml"
    for text, expected in (
        ("", None),
        ("batch_size = 16\n", 16),
        ("batch_size = 0\n", None),
    ):
        path.write_text("[embed]\n" + text)
        config = load_config(path)
        assert config.embed.batch_size == expected
        path.write_text(dump_config(config))
        assert load_config(path).embed.batch_size == expected
