import re

import pytest

from lib import config


def test_every_notebook_has_the_four_presets_and_each_resolves():
    assert list(config.NOTEBOOKS) == ["01_explore_data", "02_prepare_data", "03_pretrain", "04_ct_diffusion",
                                      "05_cxr_change", "06_xray_to_ct", "07_evaluate", "08_visualize", "09_rsna_aneurysm"]
    for name, spec in config.NOTEBOOKS.items():
        assert tuple(spec.presets) == config.PRESETS
        for preset in config.PRESETS:
            cfg = config.resolve(name, preset)
            # complete: every declared parameter is present, plus the notebook and preset names
            assert set(cfg) == set(spec.params) | {"notebook", "preset"}
            assert cfg["preset"] == preset and cfg.notebook == name


def test_preset_overlays_defaults_and_override_overlays_preset():
    smoke = config.resolve("01_explore_data", "smoke")
    demo = config.resolve("01_explore_data", "demo")
    assert smoke.max_files == config.NOTEBOOKS["01_explore_data"].presets["smoke"]["max_files"]
    assert demo.max_files == config.NOTEBOOKS["01_explore_data"].params["max_files"].default
    assert config.resolve("01_explore_data", "smoke", max_files=7).max_files == 7
    # None means "not set": the preset's value stays
    assert config.resolve("01_explore_data", "smoke", max_files=None).max_files == smoke.max_files


def test_unknown_preset_names_valid_choices():
    with pytest.raises(ValueError) as e:
        config.resolve("01_explore_data", "bogus")
    assert "bogus" in str(e.value)
    for p in config.PRESETS:
        assert p in str(e.value)


def test_unknown_notebook_and_unknown_key_name_valid_choices():
    with pytest.raises(ValueError, match="valid notebooks: 01_explore_data"):
        config.resolve("99_nothing", "smoke")
    with pytest.raises(ValueError) as e:
        config.resolve("01_explore_data", "smoke", max_file=3)
    assert "max_file" in str(e.value) and "max_files" in str(e.value) and "seed" in str(e.value)


@pytest.mark.parametrize("key,value", [("seed", "3"), ("seed", 1.5), ("seed", True), ("deterministic", 1),
                                       ("device", 0), ("max_files", [1])])
def test_wrong_type_is_rejected_with_the_expected_type(key, value):
    with pytest.raises(ValueError, match=rf"'{key}' \(override\) must be"):
        config.resolve("01_explore_data", "smoke", **{key: value})


def test_int_is_accepted_for_float_and_list_for_tuple(monkeypatch):
    spec = config.NotebookSpec(
        params={"lr": config.Param(0.1, float, "learning rate"), "sizes": config.Param((1, 2), tuple, "sizes")},
        presets={p: {} for p in config.PRESETS})
    monkeypatch.setitem(config.NOTEBOOKS, "xx_test", spec)
    cfg = config.resolve("xx_test", "demo", lr=1, sizes=[3, 4])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.sizes == (3, 4)


def test_a_bad_value_inside_a_preset_is_caught(monkeypatch):
    spec = config.NotebookSpec(params={"epochs": config.Param(1, int, "epochs")},
                               presets={**{p: {} for p in config.PRESETS}, "demo": {"epochs": "ten"}})
    monkeypatch.setitem(config.NOTEBOOKS, "xx_test", spec)
    with pytest.raises(ValueError, match=r"'epochs' \(preset demo\) must be int"):
        config.resolve("xx_test", "demo")


def test_resolved_config_is_a_fresh_copy():
    cfg = config.resolve("01_explore_data", "smoke")
    cfg["max_files"] = 12345
    assert config.resolve("01_explore_data", "smoke").max_files != 12345
    with pytest.raises(AttributeError, match="no key"):
        cfg.nope


def test_params_from_namespace_keeps_values_and_drops_modules_functions_and_ipython_names():
    import os

    ns = {"os": os, "preset": "smoke", "seed": None, "epcohs": 3, "In": [], "Out": {}, "_i1": "x",
          "get_ipython": lambda: None, "start_notebook": config.resolve, "Config": config.Config}
    assert config.params_from_namespace(ns) == {"preset": "smoke", "seed": None, "epcohs": 3}


def test_describe_lists_parameters_and_preset_values():
    text = config.describe("01_explore_data")
    assert "max_files" in text and "smoke=4" in text


def test_categorical_parameters_name_their_choices():
    with pytest.raises(ValueError, match="'cohort' \\(override\\) is 'huge'; valid choices: smoke, demo"):
        config.resolve("02_prepare_data", "demo", cohort="huge")
    assert config.resolve("02_prepare_data", "demo", cohort="smoke").cohort == "smoke"


@pytest.mark.parametrize("notebook, key, value", [("03_pretrain", "lr", 0.0), ("01_explore_data", "max_files", -3),
                                                  ("03_pretrain", "img_size", -3), ("03_pretrain", "ema_decay", 1.0),
                                                  ("03_pretrain", "gpus", -1), ("06_xray_to_ct", "high_freq_cutoff", 0.6)])
def test_a_value_outside_its_declared_range_fails_naming_the_parameter_and_the_range(notebook, key, value):
    param = config._spec_of(notebook).params[key]
    with pytest.raises(ValueError, match=rf"{notebook}: parameter '{key}' \(override\) is {value!r}, outside its "
                                         rf"range {re.escape(param.range)}"):
        config.resolve(notebook, "smoke", **{key: value})


def test_every_numeric_parameter_declares_its_range():
    from lib.presets import NOTEBOOKS

    signed = {"hu_min", "hu_max"}  # HU bounds: any sign
    missing = {k for spec in NOTEBOOKS.values() for k, p in spec.params.items()
               if p.choices is None and p.range is None and k not in signed
               and {int, float} & set(p.type if isinstance(p.type, tuple) else (p.type,)) and p.type is not bool}
    assert not missing, f"numeric parameters without a declared range: {sorted(missing)}"
    for notebook in NOTEBOOKS:  # every preset keeps its values inside the ranges
        for preset in config.PRESETS:
            config.resolve(notebook, preset)
    assert config.in_range(1, ">=1") and not config.in_range(0, ">0") and config.in_range(0, "[0,1)")
    assert not config.in_range(1, "[0,1)") and config.in_range(0.5, "(0,0.5]")
    with pytest.raises(ValueError, match="parameter range 'positive'"):
        config.Param(1, int, "x", range="positive")
