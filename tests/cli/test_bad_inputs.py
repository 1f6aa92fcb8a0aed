"""The command line given what a new user gets wrong: missing or malformed data, wrong
checkpoints, bad sizes and flags, unwritable outputs, odd images.

Each mistake is one line on stderr (no traceback) and exit status 2, answered before any work:
nothing is written where the command runs, and the inputs are left as they were. Most cases
run ``main()`` in this process (the same code path as the console script, whose own answers are
checked in a few subprocess runs at the end).
"""
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest

from rtdetr_fast import cli
from rtdetr_fast.cli import _model, bench, demo, main, train
from rtdetr_fast.data.synthetic import make_synthetic_coco

TINY_MODEL = dict(hidden_dim=32, dim_feedforward=64, num_queries=10, num_denoising=4,
                  eval_spatial_size=(64, 64))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Inputs shared by the cases: a data set, a checkpoint folder, wrong files."""
    root = tmp_path_factory.mktemp("inputs")
    make_synthetic_coco(root / "coco", num_train=2, num_val=2, size=(64, 64), seed=0)
    # a data set without its val split
    shutil.copytree(root / "coco", root / "coco_noval")
    os.remove(root / "coco_noval" / "annotations" / "instances_val.json")
    from rtdetr_fast import RTDETR

    model = RTDETR.from_name("rtdetr_r18vd", num_classes=3, **TINY_MODEL)
    model.set_categories(["rectangle", "ellipse", "triangle"], [1, 2, 3])
    model.save_pretrained(root / "ckpt")
    (root / "text.pth").write_text("hello\n")
    (root / "empty.pth").write_bytes(b"")
    with zipfile.ZipFile(root / "other.zip.pth", "w") as z:
        z.writestr("readme.txt", "not a model")
    (root / "nockpt").mkdir()
    (root / "afile").write_text("a file, not a folder\n")
    (root / "notimage.jpg").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / "noimages").mkdir()
    (root / "noimages" / "notes.txt").write_text("no images here\n")
    run = root / "earlier_run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"an earlier run's checkpoint")
    val = root / "coco" / "val"
    paths = dict(coco=root / "coco", coco_noval=root / "coco_noval", ckpt=root / "ckpt",
                 text=root / "text.pth", empty=root / "empty.pth", zip=root / "other.zip.pth",
                 nockpt=root / "nockpt", file=root / "afile", notimage=root / "notimage.jpg",
                 emptypng=root / "empty.png", noimages=root / "noimages", run=run,
                 image=val / sorted(os.listdir(val))[0], root=root)
    return {k: str(v) for k, v in paths.items()}


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def run_main(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line and ": warning: " not in line]


# (id, argv with {placeholders} from fx, what the one line says)
CASES = [
    # the command itself
    ("no-verb", [], "required: command"),
    ("unknown-verb", ["fly"], "invalid choice: 'fly'"),
    ("unknown-flag", ["train", "--data", "{coco}", "--epocs", "3"], "unrecognized arguments"),
    # train: data
    ("train-no-data-flag", ["train"], "--data"),
    ("train-data-missing", ["train", "--data", "{root}/nothing"], "does not exist"),
    ("train-data-is-file", ["train", "--data", "{file}"], "is a file"),
    ("train-data-empty-folder", ["train", "--data", "{noimages}"], "no train split"),
    ("train-data-no-val", ["train", "--data", "{coco_noval}"], "no val split"),
    # train: outputs
    ("train-output-dir-is-file", ["train", "--data", "{coco}", "--output-dir", "{file}"],
     "is a file, not a folder"),
    ("train-output-dir-under-file", ["train", "--data", "{coco}", "--output-dir", "{file}/run"],
     "cannot be created"),
    ("train-output-dir-earlier-run", ["train", "--data", "{coco}", "--output-dir", "{run}"],
     "holds the checkpoints of another run"),
    # train: sizes and numbers
    ("train-size-zero", ["train", "--data", "{coco}", "--size", "0"], "multiple of 32"),
    ("train-size-negative", ["train", "--data", "{coco}", "--size", "-32"], "multiple of 32"),
    ("train-size-not-int", ["train", "--data", "{coco}", "--size", "big"], "invalid int value"),
    ("train-epochs-zero", ["train", "--data", "{coco}", "--epochs", "0"], "--epochs must be >= 1"),
    ("train-batch-zero", ["train", "--data", "{coco}", "--batch-size", "0"],
     "--batch-size must be >= 1"),
    ("train-max-steps-zero", ["train", "--data", "{coco}", "--max-steps", "0"],
     "--max-steps must be >= 1"),
    ("train-workers-negative", ["train", "--data", "{coco}", "--workers", "-1"],
     "--workers must be >= 0"),
    ("train-lr-zero", ["train", "--data", "{coco}", "--lr", "0"], "--lr must be > 0"),
    ("train-warmup-negative", ["train", "--data", "{coco}", "--warmup-steps", "-5"],
     "--warmup-steps must be >= 0"),
    ("train-seed-negative", ["train", "--data", "{coco}", "--seed", "-1"], "--seed must be >= 0"),
    ("train-amp-unknown", ["train", "--data", "{coco}", "--amp", "fp8"], "invalid choice"),
    ("train-preset-unknown", ["train", "--data", "{coco}", "--preset", "yolo"], "invalid choice"),
    ("train-set-unknown-key", ["train", "--data", "{coco}", "--set", "num_quereis=100"],
     "unknown override"),
    ("train-set-no-equals", ["train", "--data", "{coco}", "--set", "num_queries"],
     "not of the form key=value"),
    ("train-set-wrong-type", ["train", "--data", "{coco}", "--set", "num_queries=abc"],
     "num_queries"),
    # train: checkpoints and names
    ("train-resume-missing", ["train", "--data", "{coco}", "--resume", "{root}/gone.pth"],
     "no such file"),
    ("train-resume-text", ["train", "--data", "{coco}", "--resume", "{text}"],
     "is not a checkpoint"),
    ("train-resume-and-checkpoint", ["train", "--data", "{coco}", "--resume", "{text}",
                                     "--checkpoint", "{ckpt}"], "not both"),
    ("train-checkpoint-text", ["train", "--data", "{coco}", "--checkpoint", "{text}"],
     "is not a checkpoint"),
    ("train-names-missing-file", ["train", "--data", "{coco}", "--names", "names.txt"],
     "no such file"),
    ("train-names-folder", ["train", "--data", "{coco}", "--names", "{noimages}"],
     "is a folder"),
    ("train-device-unknown", ["train", "--data", "{coco}", "--device", "gpu0"],
     "is not a device"),
    # eval
    ("eval-data-missing", ["eval", "--data", "/nonexistent/coco", "--checkpoint", "{ckpt}"],
     "does not exist"),
    ("eval-no-checkpoint", ["eval", "--data", "{coco}"], "eval needs --checkpoint"),
    ("eval-checkpoint-text", ["eval", "--data", "{coco}", "--checkpoint", "{text}"],
     "is not a checkpoint"),
    ("eval-checkpoint-empty", ["eval", "--data", "{coco}", "--checkpoint", "{empty}"],
     "is not a checkpoint"),
    ("eval-checkpoint-foreign-zip", ["eval", "--data", "{coco}", "--checkpoint", "{zip}"],
     "is not a checkpoint"),
    ("eval-checkpoint-empty-folder", ["eval", "--data", "{coco}", "--checkpoint", "{nockpt}"],
     "folder without config.json"),
    ("eval-json-is-folder", ["eval", "--data", "{coco}", "--checkpoint", "{ckpt}", "--json",
                             "{noimages}"], "is a folder"),
    ("eval-json-under-file", ["eval", "--data", "{coco}", "--checkpoint", "{ckpt}", "--json",
                              "{file}/m.json"], "cannot be created"),
    ("eval-split-unknown", ["eval", "--data", "{coco}", "--checkpoint", "{ckpt}", "--split",
                            "test"], "invalid choice"),
    ("eval-batch-zero", ["eval", "--data", "{coco}", "--checkpoint", "{ckpt}", "--batch-size",
                         "0"], "--batch-size must be >= 1"),
    # predict
    ("predict-no-images", ["predict", "--checkpoint", "{ckpt}"], "at least one image"),
    ("predict-no-checkpoint", ["predict", "{image}"], "predict needs --checkpoint"),
    ("predict-checkpoint-missing", ["predict", "{image}", "--checkpoint", "{root}/gone.pth"],
     "no such file or folder"),
    ("predict-image-missing", ["predict", "{root}/gone.jpg", "--checkpoint", "{ckpt}"],
     "no image file, folder or glob match"),
    ("predict-folder-without-images", ["predict", "{noimages}", "--checkpoint", "{ckpt}"],
     "no image files"),
    ("predict-not-an-image", ["predict", "{notimage}", "--checkpoint", "{ckpt}"],
     "is not a readable image"),
    ("predict-no-readable-image", ["predict", "{notimage}", "{emptypng}", "--checkpoint",
                                   "{ckpt}"], "none of the 2 inputs is a readable image"),
    ("predict-out-is-file", ["predict", "{image}", "--checkpoint", "{ckpt}", "--out", "{file}"],
     "is a file, not a folder"),
    ("predict-threshold-negative", ["predict", "{image}", "--checkpoint", "{ckpt}",
                                    "--threshold", "-1"], "between 0 and 1"),
    ("predict-threshold-above-one", ["predict", "{image}", "--checkpoint", "{ckpt}",
                                     "--threshold", "1.5"], "between 0 and 1"),
    ("predict-threshold-nan", ["predict", "{image}", "--checkpoint", "{ckpt}",
                               "--threshold", "nan"], "between 0 and 1"),
    ("predict-size-negative", ["predict", "{image}", "--checkpoint", "{ckpt}", "--size", "-32"],
     "square input size in pixels"),
    ("predict-names-empty-item", ["predict", "{image}", "--checkpoint", "{ckpt}", "--names",
                                  "a,,b"], "comma-separated names"),
    ("predict-num-classes-zero", ["predict", "{image}", "--checkpoint", "{ckpt}",
                                  "--num-classes", "0"], "--num-classes must be >= 1"),
    # bench, demo, export
    ("bench-batch-zero", ["bench", "--batch", "0"], "--batch must be >= 1"),
    ("bench-repeats-zero", ["bench", "--repeats", "0"], "--repeats must be >= 1"),
    ("bench-size-small", ["bench", "--size", "31"], "multiple of 32"),
    ("demo-out-is-file", ["demo", "--out", "{file}"], "is a file, not a folder"),
    ("demo-epochs-zero", ["demo", "--epochs", "0"], "--epochs must be >= 1"),
    ("demo-num-train-zero", ["demo", "--num-train", "0"], "--num-train must be >= 1"),
    ("demo-time-budget-zero", ["demo", "--time-budget", "0"], "--time-budget"),
    ("export-output-is-folder", ["export", "--output", "{noimages}"], "is a folder"),
    ("export-output-under-file", ["export", "--output", "{file}/m.onnx"], "cannot be created"),
    ("export-checkpoint-text", ["export", "--checkpoint", "{text}"], "is not a checkpoint"),
    ("export-opset-unsupported", ["export", "--checkpoint", "{ckpt}", "--opset", "3"],
     "opset 3 is not supported"),
]


def test_the_sweep_is_wide():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_exit_status_2(fx, argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where default outputs (outputs/, model.onnx...) would go

    def no_work(*args, **kwargs):
        raise AssertionError("the mistake was not caught before the work began")

    # every case is answered before a model is built or a verb's work starts
    for module, name in ((_model, "build_model"), (train, "run"), (bench, "run"), (demo, "run")):
        monkeypatch.setattr(module, name, no_work)
    before = snapshot(fx["root"])
    rc, out, err = run_main([a.format(**fx) for a in argv], capsys)
    lines = error_lines(err)
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and ": error: " in lines[0] and lines[0].startswith("rtdetr-fast"), err
    assert says in lines[0], lines[0]
    assert os.listdir(tmp_path) == [], "written where the command ran"
    assert snapshot(fx["root"]) == before, "an input was changed"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into any folder")
def test_an_unwritable_output_folder(fx, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        rc, _, err = run_main(["train", "--data", fx["coco"], "--output-dir",
                               str(locked / "run")], capsys)
    finally:
        locked.chmod(stat.S_IRWXU)
    assert rc == 2 and "is not writable" in err and os.listdir(locked) == []


def test_a_size_not_a_multiple_of_32_warns(fx, tmp_path, capsys):
    """--size 100 is accepted (the model runs at any size) with a warning that says why 96 or
    128 are better; checked on train's argument check, before any work."""
    args = cli.build_parser().parse_args(["train", "--data", fx["coco"], "--size", "100",
                                          "--output-dir", str(tmp_path / "run")])
    cli.validate(args)
    err = capsys.readouterr().err
    assert "warning: --size 100 is not a multiple of 32 (96 or 128 are)" in err
    assert "ONNX export" in err and not (tmp_path / "run").exists()


@pytest.mark.pycocotools
def test_too_little_disk_for_the_checkpoints(fx, tmp_path, monkeypatch, capsys):
    """The free-space check runs once the model is built, before the first step; nothing is
    trained or written."""
    seen = []

    def free(path):
        seen.append(path)
        return 1 << 20  # 1 MiB

    monkeypatch.setattr(train, "_free_bytes", free)
    out = tmp_path / "run"
    rc, _, err = run_main(["train", "--data", fx["coco"], "--output-dir", str(out), "--size",
                           "64", "--workers", "0", "--set", "hidden_dim=32",
                           "dim_feedforward=64", "num_queries=10", "num_denoising=4"], capsys)
    assert rc == 2, err
    assert "not enough free space for the run's checkpoints" in error_lines(err)[0]
    assert seen and not out.exists()


def test_names_that_do_not_fit_the_model(fx, tmp_path, capsys):
    rc, _, err = run_main(["predict", fx["image"], "--checkpoint", fx["ckpt"], "--names", "a,b",
                           "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "2 category names for a model of 3 classes" in error_lines(err)[0]
    assert not (tmp_path / "out").exists()


def test_images_that_cannot_be_decoded_exit_1_and_keep_the_earlier_json(fx, tmp_path, capsys):
    """A file whose header reads but whose pixels do not (truncated) is found only when it is
    decoded: predict skips it; when no image could be read it exits 1 without writing
    detections.json, so an earlier run's file is kept."""
    from PIL import Image

    png = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(png)
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").write_text("[\"earlier\"]")
    rc, _, err = run_main(["predict", str(png), "--checkpoint", fx["ckpt"], "--out", str(out)],
                          capsys)
    assert rc == 1, err
    assert "Traceback" not in err and "none of the 1 images could be read" in err
    assert json.loads((out / "detections.json").read_text()) == ["earlier"]


# ------------------------------------------------------------------- as the user runs it
def run_cli(*argv, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "rtdetr_fast", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def test_subprocess_output_dir_is_a_file(fx, tmp_path):
    proc = run_cli("train", "--data", fx["coco"], "--output-dir", fx["file"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"rtdetr-fast train: error: --output-dir {fx['file']!r} is a file, not a folder: give "
        "a folder to write into"]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("rtdetr-fast") is None, reason="console script not on PATH")
def test_console_script_predict_out_is_a_file(fx, tmp_path):
    proc = subprocess.run(["rtdetr-fast", "predict", fx["image"], "--checkpoint", fx["ckpt"],
                           "--out", fx["file"]], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "is a file" in proc.stderr


def test_subprocess_text_file_as_checkpoint(fx, tmp_path):
    proc = run_cli("eval", "--data", fx["coco"], "--checkpoint", fx["text"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "is not a checkpoint" in line and "KeyError" not in line


def test_subprocess_predict_odd_images(fx, tmp_path):
    """Odd but readable images (1x1, grayscale, CMYK, palette with alpha, 16-bit, a PNG named
    .jpg) are predicted; an unreadable one is skipped with a one-line warning; exit 0; the
    JSON numbers each input by its position; --size 100 warns."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (1, 1), (10, 200, 10)).save(folder / "a_tiny.png")
    Image.new("L", (40, 30), 128).save(folder / "b_gray.png")
    Image.new("CMYK", (50, 40), (0, 100, 200, 0)).save(folder / "c_cmyk.jpg")
    Image.new("RGBA", (30, 50), (0, 0, 255, 100)).convert("P").save(folder / "d_palette.png")
    Image.new("I;16", (32, 32), 40000).save(folder / "e_16bit.png")
    Image.new("RGB", (60, 60), (90, 90, 90)).save(folder / "f_png_named.jpg", format="PNG")
    (folder / "g_broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    proc = run_cli("predict", str(folder), "--checkpoint", fx["ckpt"], "--out", str(out),
                   "--threshold", "0", "--size", "100", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 2 and "--size 100 is not a multiple of 32" in warnings[0]
    assert "skipping" in warnings[1] and "g_broken.png" in warnings[1]
    records = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in records} <= set(range(1, 7))
    assert sorted(p.name for p in out.glob("*_det.png")) == [
        f"{n}_det.png" for n in ("a_tiny", "b_gray", "c_cmyk", "d_palette", "e_16bit",
                                 "f_png_named")]
    assert "6 images" in proc.stdout and "1 unreadable images skipped" in proc.stdout


def test_subprocess_nothing_readable_exits_2_without_output(fx, tmp_path):
    proc = run_cli("predict", fx["notimage"], fx["emptypng"], "--checkpoint", fx["ckpt"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []
