"""Issue 19, config faults: non-finite values (5), a method whose terms need SS views given none (7), YAML
and ``--set`` values of the wrong type (9), CRD on data smaller than ``nce_k`` (10), malformed values (11).

Each fault goes through the real entry (``sskd.cli.main``: exit 2, one line on stderr, no traceback, nothing
written in ``--out``) or the config loader the commands use."""

from __future__ import annotations

import math

import pytest

from sskd.cli import main
from sskd.core.errors import SSKDError
from sskd.engine.config import load_config


def _refused(capsys, argv, needle, out=None):
    """``sskd ARGV`` exits 2 with one line containing ``needle`` (and names it), no traceback, no --out."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[sskd]")]
    assert rc == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("sskd: error: "), (argv, err)
    assert needle in lines[0], (argv, lines[0])
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists(), f"{argv}: a refused start wrote {out}"
    return lines[0]


def _teacher_cmd(shards, out, *extra):
    return [
        "train-teacher",
        "--shards",
        shards,
        "--arch",
        "resnet8",
        "--out",
        out,
        "--max-steps",
        1,
        "--no-progress",
        *extra,
    ]


# ---- 5: non-finite (and obviously invalid) numbers are refused at start, naming the key -------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "teacher.lr=nan"], "teacher.lr: 'nan' is not a finite number"),
        (["--set", "teacher.lr=.nan"], "teacher.lr: nan is not a finite number"),
        (["--lr", "inf"], "teacher.lr: 'inf' is not a finite number"),
        (["--lr=-inf"], "teacher.lr: '-inf' is not a finite number"),
        (["--set", "teacher.momentum=nan"], "teacher.momentum"),
        (["--set", "teacher.weight_decay=.inf"], "teacher.weight_decay: inf is not a finite number"),
        (["--set", "teacher.warmup_epochs=nan"], "teacher.warmup_epochs"),
        (["--set", "teacher.clip_grad=inf"], "teacher.clip_grad"),
        (["--set", "sskd.ss_T=nan"], "sskd.ss_T: 'nan' is not a finite number"),
        (["--set", "kd.kd_weight=inf"], "kd.kd_weight"),
        (["--set", "teacher.epochs=.inf"], "teacher.epochs: inf is not a finite number"),
        (["--set", "teacher.weight_decay=-0.1"], "teacher.weight_decay must be >= 0, not -0.1"),
        (["--set", "kd.T=-4"], "kd.T must be > 0, not -4.0"),
    ],
)
def test_non_finite_and_negative_values_are_refused_naming_the_key(capsys, tmp_path, extra, needle):
    out = tmp_path / "t"
    _refused(capsys, _teacher_cmd(tmp_path / "no-shards", out, *extra), needle, out)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("teacher:\n  lr: .nan\n", "teacher.lr: nan is not a finite number"),
        ("teacher:\n  lr: .inf\n", "teacher.lr: inf is not a finite number"),
        ("teacher:\n  lr: -.inf\n", "teacher.lr: -inf is not a finite number"),
        ("teacher:\n  momentum: nan\n", "teacher.momentum: 'nan' is not a finite number"),  # a string to YAML
        ("sskd:\n  kd_T: .inf\n", "sskd.kd_T: inf is not a finite number"),
        ("data:\n  subset_fraction: .nan\n", "data.subset_fraction"),
    ],
)
def test_non_finite_values_in_a_recipe_are_refused(capsys, tmp_path, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "t"
    line = _refused(capsys, _teacher_cmd(tmp_path / "no-shards", out, "--config", recipe), needle, out)
    assert str(recipe) in line


def test_a_non_finite_value_set_in_code_is_refused_by_validate():
    from sskd.engine.config import Config, validate

    cfg = Config()
    cfg.student.lr = math.nan  # NaN passes every `<` / `>` comparison: the bounds alone let it through
    with pytest.raises(SSKDError, match=r"config: student.lr must be a finite number, not nan"):
        validate(cfg)


def test_finite_values_still_load():
    cfg = load_config(None, ["student.lr=1e-3", "student.lr=1e8", "sskd.ss_T=0.5", "teacher.clip_grad=5"])
    assert cfg.student.lr == 1e8 and cfg.section("sskd").ss_T == 0.5 and cfg.teacher.clip_grad == 5.0


# ---- 7: a method whose terms need SS views refuses a view set without them --------------------------------


@pytest.mark.parametrize(
    "command, method, views, needle",
    [
        (
            "distill",
            "sskd",
            "none",
            "method 'sskd' (distill) needs at least 1 SS view beside the normal view "
            "(its own: rotation; leave --views out or name views), not 'none'",
        ),
        ("distill", "sskd", "", "method 'sskd' (distill) needs at least 1 SS view"),
        ("train-ss-head", "sskd", "none", "method 'sskd' (train-ss-head) needs at least 1 SS view"),
        ("distill", "hssakd", "none", "method 'hssakd' trains on its own views (shared_rotation)"),
        ("distill", "kdss", "", "method 'kdss' trains on its own views (shared_rotation)"),
        ("train-ss-head", "kdss", "none", "method 'kdss' trains on its own views"),
        ("train-teacher", "hssakd", "none", "method 'hssakd' trains on its own views"),
    ],
)
def test_a_method_that_needs_ss_views_refuses_none_before_training(
    capsys, digits_shards, tmp_path, command, method, views, needle
):
    out = tmp_path / "run"
    argv = [
        command,
        "--method",
        method,
        "--shards",
        digits_shards,
        "--out",
        out,
        "--views",
        views,
        "--max-steps",
        1,
        "--no-progress",
    ]
    if command != "train-teacher":
        argv += ["--teacher", tmp_path / "no-teacher"]  # refused before the teacher is even looked for
    if command == "distill":
        argv += ["--student", "resnet8"]
    else:
        argv += ["--arch", "resnet8"] if command == "train-teacher" else []
    line = _refused(capsys, argv, needle, out)
    assert "data.views" in line


def test_the_rule_is_declared_by_the_method():
    """``Method.min_ss_views`` is the seam: a plug-in that needs two SS views refuses a set of one."""
    from sskd.methods import method_class, resolve_views

    sskd_cls = method_class("student", "sskd")
    assert sskd_cls.min_ss_views == 1 and method_class("head", "sskd").min_ss_views == 1
    assert method_class("student", "kd").min_ss_views == 0

    class TwoViews(sskd_cls):  # not registered: the check reads the class, not the registry
        min_ss_views = 2

    assert resolve_views(load_config(None, ["data.views=rot90,rot180"]), TwoViews).ss_views == (
        "rot90",
        "rot180",
    )
    with pytest.raises(SSKDError, match=r"needs at least 2 SS views beside the normal view .* not 'rot90'"):
        resolve_views(load_config(None, ["data.views=rot90"]), TwoViews)
    # methods on the normal view only are unaffected by --views none
    assert resolve_views(load_config(None, ["data.views=none"]), method_class("student", "kd")) is None
    assert resolve_views(load_config(None, ["data.views=rot90"]), sskd_cls).ss_views == ("rot90",)


# ---- 9: values of the wrong type are type errors naming the key -------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("teacher:\n  batch_size: true\n", "teacher.batch_size: expected an integer, got a boolean (True)"),
        ("teacher:\n  epochs: [3]\n", "teacher.epochs: expected an integer, got a list ([3])"),
        ("teacher:\n  epochs: 2.5\n", "teacher.epochs: 2.5 is not a whole number"),
        ("teacher:\n  lr: false\n", "teacher.lr: expected a number, got a boolean (False)"),
        ("teacher:\n  lr: {a: 1}\n", "teacher.lr: expected a number, got a mapping"),
        ("teacher:\n  lr: fast\n", "teacher.lr: 'fast' is not a valid float"),
        ("teacher:\n  batch_size: null\n", "teacher.batch_size: may not be empty"),
        ("teacher:\n  nesterov: 2\n", "teacher.nesterov: expected true or false, got a number (2)"),
        ("teacher:\n  nesterov: [true]\n", "teacher.nesterov: expected true or false, got a list"),
        ("teacher:\n  nesterov: maybe\n", "teacher.nesterov: expected true or false, got a string ('maybe')"),
        ("teacher:\n  arch: 18\n", "teacher.arch: expected a string, got a number (18) (quote it)"),
        ("teacher:\n  schedule: [step]\n", "teacher.schedule: expected a string, got a list"),
        ("teacher:\n  milestones: '30,60'\n", "teacher.milestones: expected a list, got a string ('30,60')"),
        ("teacher:\n  milestones: 30\n", "teacher.milestones: expected a list, got a number (30)"),
        (
            "teacher:\n  milestones: [30, true]\n",
            "teacher.milestones: expected an integer, got a boolean (True)",
        ),
        ("teacher:\n  milestones: [30.5]\n", "teacher.milestones: 30.5 is not a whole number"),
        ("run:\n  log_with: tensorboard\n", "run.log_with: expected a list, got a string ('tensorboard')"),
        ("run:\n  seed: yes\n", "run.seed: expected an integer, got a boolean (True)"),
    ],
)
def test_wrong_types_in_a_recipe_are_type_errors(capsys, tmp_path, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = tmp_path / "t"
    line = _refused(capsys, _teacher_cmd(tmp_path / "no-shards", out, "--config", recipe), needle, out)
    assert str(recipe) in line


@pytest.mark.parametrize(
    "item, needle",
    [
        (
            "teacher.batch_size=true",
            "--set teacher.batch_size=true: teacher.batch_size: expected an integer, got a boolean",
        ),
        ("teacher.batch_size=[64]", "teacher.batch_size: expected an integer, got a list"),
        ("teacher.lr=yes", "teacher.lr: expected a number, got a boolean"),
        ("run.progress=2", "run.progress: expected true or false, got a number (2)"),
        ("run.seed=null", "run.seed: may not be empty"),
        ("teacher.schedule=[step]", "teacher.schedule: expected a string, got a list"),
        ("teacher.milestones=[1,true]", "teacher.milestones: expected an integer, got a boolean"),
        ("teacher.milestones={a: 1}", "teacher.milestones: expected a list, got a mapping"),
    ],
)
def test_wrong_types_in_set_overrides_are_type_errors(capsys, tmp_path, item, needle):
    out = tmp_path / "t"
    _refused(capsys, _teacher_cmd(tmp_path / "no-shards", out, "--set", item), needle, out)


def test_right_types_still_load_and_the_word_no_stays_a_word(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "teacher:\n  lr: 1e-3\n  epochs: 3.0\n  batch_size: '32'\n  nesterov: yes\n  milestones: [1, 2]\n"
        "run:\n  mixed_precision: no\n  progress: off\n  log_with: [tensorboard]\n"
    )
    cfg = load_config(recipe)
    assert (cfg.teacher.lr, cfg.teacher.epochs, cfg.teacher.batch_size) == (1e-3, 3, 32)
    assert cfg.teacher.nesterov is True and cfg.teacher.milestones == [1, 2]
    assert (
        cfg.run.mixed_precision == "no" and cfg.run.progress is False and cfg.run.log_with == ["tensorboard"]
    )
    cfg = load_config(
        None,
        [
            "run.mixed_precision=no",
            "run.progress=0",
            "teacher.milestones=30,60",
            "data.shards=2024",
            "run.log_with=tensorboard",
            "student.milestones=[5]",
            "teacher.max_steps=null",
        ],
    )
    assert (
        cfg.run.mixed_precision == "no" and cfg.run.progress is False and cfg.teacher.milestones == [30, 60]
    )
    assert cfg.data.shards == "2024" and cfg.run.log_with == ["tensorboard"] and cfg.student.milestones == [5]
    assert cfg.teacher.max_steps is None
    assert load_config(None, ["run.mixed_precision=false"]).run.mixed_precision == "no"  # a sweep's YAML `no`


def test_mixed_precision_no_through_the_flags():
    from sskd.cli import build_parser
    from sskd.cli.train import resolve_config

    args = build_parser().parse_args(
        [
            "train-teacher",
            "--shards",
            "s",
            "--out",
            "o",
            "--mixed-precision",
            "no",
            "--lr",
            "0.2",
            "--batch-size",
            "8",
            "--views",
            "none",
        ]
    )
    cfg = resolve_config(args, "teacher")
    assert (cfg.run.mixed_precision, cfg.teacher.lr, cfg.teacher.batch_size, cfg.data.views) == (
        "no",
        0.2,
        8,
        "none",
    )


# ---- 11: malformed values: one line naming the key or option, exit 2, no traceback --------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ["--set", "teacher.milestones=[1,"],
            "--set teacher.milestones=[1,: teacher.milestones: '[1,' is not a valid value",
        ),
        (["--set", "teacher.lr={"], "teacher.lr: '{' is not a valid value"),
        (["--set", "run.log_with=[a"], "run.log_with: '[a' is not a valid value"),
        (["--views", ",,"], "data.views: ',,' names no view"),
        (["--views", " , "], "data.views: ',' names no view"),
        (["--set", "data.views=,"], "data.views: ',' names no view"),
    ],
)
def test_malformed_values_are_one_line(capsys, tmp_path, extra, needle):
    out = tmp_path / "t"
    _refused(capsys, _teacher_cmd(tmp_path / "no-shards", out, *extra), needle, out)


def test_a_malformed_view_list_through_the_views_command(capsys, digits_shards, tmp_path):
    _refused(
        capsys,
        ["views", "--shards", digits_shards, "--views", ",,", "--out", tmp_path / "v.png"],
        "names no view",
        tmp_path / "v.png",
    )


# ---- 10: CRD on data smaller than nce_k draws with replacement, as RepDistiller -----------------------------


def test_crd_negatives_on_the_digits_with_and_without_replacement(digits_shards):
    """At 16,384 (> the 1,291..1,297 samples of other classes each digit has) the negatives repeat, stay in other
    classes and are a pure function of (seed, epoch, id); at 64 they are exactly the draws without replacement
    the sampler always made (numpy's choice over the other classes' positions), so larger data is unchanged."""
    import numpy as np

    from shards.labels import split_labels
    from sskd.methods.crd import SAMPLING_TAG, NegativeSampler

    labels = np.asarray(split_labels(digits_shards, "train"))
    ids = np.array([0, 7, 500, len(labels) - 1])
    big = NegativeSampler(labels, 16384, seed=1)
    out = big.draw(ids, epoch=3)
    assert out.shape == (4, 16385) and (out[:, 0] == ids).all()
    for row, i in zip(out, ids):
        assert (labels[row[1:]] != labels[i]).all() and len(set(row[1:].tolist())) < 16384
    assert (NegativeSampler(labels, 16384, seed=1).draw(ids[::-1], epoch=3) == out[::-1]).all()
    assert not (big.draw(ids, epoch=4) == out).all()
    small = NegativeSampler(labels, 64, seed=1)
    got = small.draw(ids, epoch=3)
    for row, i in zip(got, ids):
        c = labels[i]
        rng = np.random.default_rng((SAMPLING_TAG, 1, 3, int(i)))
        j = rng.choice(len(small.order) - small.counts[c], 64, replace=False, shuffle=False)
        want = small.order[j + small.counts[c] * (j >= small.starts[c])]
        assert row[1:].tolist() == want.tolist() and len(set(want.tolist())) == 64


def test_crd_trains_on_the_digits_at_the_default_nce_k(digits_shards, tmp_path, caplog):
    """1,437 training digits, nce_k 16,384: every class draws with replacement (said once) and trains."""
    from sskd.methods.crd import CRDConfig
    from sskd.runs import load_model_info, read_metrics

    assert CRDConfig().nce_k == 16384
    teacher, student = tmp_path / "t", tmp_path / "s"
    assert main([str(a) for a in _teacher_cmd(digits_shards, teacher, "--batch-size", 8)]) == 0
    caplog.clear()
    with caplog.at_level("INFO"):
        rc = main(
            [
                str(a)
                for a in [
                    "distill",
                    "--method",
                    "crd",
                    "--teacher",
                    teacher,
                    "--student",
                    "resnet8",
                    "--shards",
                    digits_shards,
                    "--out",
                    student,
                    "--max-steps",
                    2,
                    "--batch-size",
                    8,
                    "--no-progress",
                    "--set",
                    "run.log_every=1",
                    "--set",
                    "data.eval_batch_size=128",
                ]
            ]
        )
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if "drawn with replacement" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "crd: 10 classes have fewer samples of other classes than crd.nce_k=16384"
    ), said
    info = load_model_info(student)
    assert (info["method"], info["steps"]) == ("crd", 2)
    rec = [r for r in read_metrics(student) if r["kind"] == "train"][-1]
    assert math.isfinite(rec["crd"]) and rec["crd"] > 0 and math.isfinite(rec["loss"])
