"""Config: defaults are the official recipe, YAML and --set override, bad keys fail with a clear line."""

import pytest

from sskd.core.errors import SSKDError
from sskd.engine.config import Config, from_dict, load_config


def test_defaults_are_the_official_sskd_recipe():
    cfg = Config()
    assert (cfg.student.lr, cfg.student.momentum, cfg.student.weight_decay, cfg.student.batch_size) == (
        0.05,
        0.9,
        5e-4,
        64,
    )
    assert cfg.student.milestones == [150, 180, 210] and cfg.student.epochs == 240
    assert (cfg.ss_head.epochs, cfg.ss_head.milestones) == (60, [30, 45])
    loss = cfg.section("sskd")
    assert (loss.ce_weight, loss.kd_weight, loss.tf_weight, loss.ss_weight) == (0.1, 0.9, 2.7, 10.0)
    assert (loss.kd_T, loss.tf_T, loss.ss_T, loss.ss_ratio, loss.tf_ratio) == (4.0, 4.0, 0.5, 0.75, 1.0)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("student:\n  arch: wrn_16_2\n  lr: 0.01\nrun:\n  seed: 3\n")
    cfg = load_config(f, ["student.lr=0.2", "student.milestones=[5,7]", "run.global_ss_batch=true"])
    assert cfg.student.arch == "wrn_16_2"
    assert cfg.student.lr == 0.2
    assert cfg.student.milestones == [5, 7]
    assert cfg.run.seed == 3 and cfg.run.global_ss_batch is True


def test_round_trip_through_dict():
    cfg = load_config(None, ["student.max_steps=7", "teacher.clip_grad=1.5"])
    again = from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("student:\n  lrr: 0.1\n", "unknown config key 'student.lrr' (did you mean 'lr'?)"),
        ("studnet:\n  lr: 0.1\n", "unknown config section 'studnet' (did you mean 'student'?)"),
        ("student:\n  lr: fast\n", "student.lr: 'fast' is not a valid float"),
        ("student:\n  schedule: linear\n", "student.schedule must be one of step, cosine, not 'linear'"),
        ("student: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SSKDError) as err:
        load_config(f)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(SSKDError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(SSKDError, match="expected section.key=value"):
        load_config(None, ["lr=0.1"])


def test_shipped_recipes_all_load():
    from pathlib import Path

    import sskd
    from sskd.experiments.sweep import load_spec

    configs = Path(sskd.__file__).parent / "configs"
    recipes = sorted(p for p in configs.rglob("*.yaml") if "sweeps" not in p.parts)
    assert len(recipes) >= 13  # 11 CIFAR-100 pairs, ImageNet, demo
    for path in recipes:
        cfg = load_config(path)
        assert cfg.student.arch and cfg.teacher.arch, path
    specs = sorted((configs / "sweeps").glob("*.yaml"))  # sweep specs, not recipes
    assert specs
    for path in specs:
        assert load_spec(path).methods, path


def _resolved(*argv):
    from sskd.cli import build_parser
    from sskd.cli.train import resolve_config

    args = build_parser().parse_args(["train-teacher", "--shards", "s", "--out", "o", *argv])
    return resolve_config(args, "teacher")


def test_zero_valued_flags_reach_the_config():
    """``value not in (None, False)`` dropped 0 (0 == False): --lr 0 trained at 0.05, --epochs 0 for 240."""
    assert _resolved("--lr", "0").teacher.lr == 0.0
    assert _resolved("--seed", "0", "--set", "run.seed=5").run.seed == 5  # --set still wins
    assert _resolved("--set", "run.seed=5", "--seed", "0").run.seed == 5
    for argv, needle in [
        (["--epochs", "0"], "teacher.epochs must be >= 1, not 0"),
        (["--batch-size", "0"], "teacher.batch_size must be >= 1, not 0"),
        (["--max-steps", "0"], "teacher.max_steps must be >= 1, not 0"),
        (["--lr", "-1"], "teacher.lr must be >= 0, not -1.0"),
        (["--threads", "0"], "data.threads must be >= 1, not 0"),
        (["--views", "rotation,spin"], "data.views: unknown view 'spin'"),
        (["--set", "sskd.ss_ratio=1.5"], "sskd.ss_ratio must be > 0 and <= 1, not 1.5"),
        (["--set", "kd.ss_T=1"], "unknown config key 'kd.ss_T' ('ss_T' is a key of section 'sskd')"),
        (
            ["--method", "hssakd", "--set", "student.method=nope"],
            "student.method: unknown distill method 'nope'",
        ),
    ]:
        with pytest.raises(SSKDError) as err:
            _resolved(*argv)
        assert needle in str(err.value) and "\n" not in str(err.value), argv


def test_the_word_no_stays_a_word_in_a_string_field(tmp_path):
    assert load_config(None, ["run.mixed_precision=no"]).run.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run:\n  mixed_precision: no\n")
    assert load_config(recipe).run.mixed_precision == "no"
    assert load_config(None, ["run.mixed_precision=bf16"]).run.mixed_precision == "bf16"
