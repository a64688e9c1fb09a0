"""Smoke tests of the benchmark scripts: each main() at its tiniest settings, checking the output's
structure (never timings), and the RESULTS.md section writer."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_bench_train(bench, tmp_path):
    out = tmp_path / "train.json"
    res = bench("bench_train").main(["--cases", "demo/usage_cnn", "--size", "64", "--batch", "1", "--steps", "1",
                                     "--warmup", "0", "--no-isolate", "--breakdown", "always", "--json", str(out)])
    assert json.loads(out.read_text())["cases"][0]["preset"] == "demo/usage_cnn"
    assert res["peak_flops"] > 0 and "machine" in res and "cpu_share" in res
    (case,) = res["cases"]
    for r in (case["method"], case["backbone"]):
        assert r["step_s"] > 0 and r["img_s"] > 0 and r["flops"] > 0 and r["peak_mem_mb"] > 0
        assert (r["size"], r["batch"]) == (64, 1)
    assert case["method"]["flops"] > case["backbone"]["flops"]  # USAGE adds a teacher forward
    assert case["ratio"] == pytest.approx(case["method"]["step_s"] / case["backbone"]["step_s"])
    assert list(case["breakdown"]) == ["teacher fwd + L_REG + EMA"] and "ema_s" in case["method"]
    assert "| `demo/usage_cnn` | method |" in res["markdown"]


def test_grouped_conv_flops(bench):
    """torch's counter multiplies a grouped conv's grad-weight FLOPs by `groups`; ours does not."""
    import torch

    count = bench("bench_train").count_flops
    conv = torch.nn.Conv2d(8, 8, 3, groups=8)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    fwd = count(lambda: conv(x))
    assert count(lambda: conv(x).sum().backward()) == 3 * fwd


def test_bench_infer(bench, tmp_path):
    res = bench("bench_infer").main(["--sizes", "1,2", "--num-train", "2", "--image-size", "96", "--work",
                                     str(tmp_path), "--no-isolate", "--json", str(tmp_path / "i.json")])
    rows = res["rows"]
    assert [(r["crf"], r["images"]) for r in rows] == [(False, 1), (False, 2), (True, 1), (True, 2)]
    for r in rows:
        assert r["img_s"] > 0 and r["peak_rss_mb"] >= r["rss_at_start_mb"] > 0 and "rss_growth_mb" in r
    assert "Streaming:" in res["markdown"]


def test_bench_eval(bench, tmp_path):
    res = bench("bench_eval").main(["--masks", "6", "--pool", "3", "--repeats", "1", "--threads", "1",
                                    "--json", str(tmp_path / "e.json")])
    assert [(r["path"], r["threads"]) for r in res["rows"]] == [("memory", 1), ("disk", 1)]
    assert all(r["masks_s"] > 0 for r in res["rows"])
    assert res["same_miou"] and 0 < res["miou"] <= 1


def test_make_pair_shape(bench):
    import numpy as np

    pred, gt = bench("bench_eval").make_pair(np.random.default_rng(0))
    assert pred.shape == gt.shape == (375, 500) and pred.dtype == gt.dtype == np.uint8
    assert 255 in gt and set(np.unique(gt).tolist()) - {255} <= set(range(21))


def test_write_section_keeps_other_sections(bench, tmp_path):
    common = bench("common")
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n## Ablation: tkp\n\n<!-- ablation:tkp -->\nA\n<!-- /ablation:tkp -->\n")
    common.write_section("eval", "Evaluator", "one", path)
    common.write_section("gpu", "GPU", "two", path)
    common.write_section("eval", "Evaluator", "three", path)
    doc = path.read_text()
    assert "<!-- ablation:tkp -->\nA\n<!-- /ablation:tkp -->" in doc
    assert "three" in doc and "one" not in doc and "two" in doc
    assert doc.count("## Evaluator") == 1 and doc.index("## Evaluator") < doc.index("## GPU")


def test_run_isolated(bench):
    out = bench("common").run_isolated(BENCH / "common.py", "machine", {"device": "cpu"})
    assert isinstance(out, str) and "torch" in out


def test_bench_crf(bench):
    pytest.importorskip("pydensecrf")
    (res,) = bench("bench_crf").main(["--images", "1", "--num-classes", "6"])
    assert res["num_classes"] == 6 and set(res["ms"]) == {"none", "none_present", "present", "all"}
    assert all(0 <= v <= 1 for v in res["miou"].values()) and res["setup_ms"]["all"] > 0
    # seeded: the leak onto absent classes is what present-class restriction removes
    assert res["miou"]["none_present"] >= res["miou"]["none"]


def test_bench_crf_iteration_sweep_runs_the_counts_given(bench):
    pytest.importorskip("pydensecrf")
    rows = bench("bench_crf").iteration_sweep(1, 0, "vit_pcm", 6, [1, 8])
    assert [r["iterations"] for r in rows] == [1, 8]
    # the count reaches pydensecrf (not the preset's 10): the masks differ between 1 and 8 iterations
    for name in ("present", "all"):
        assert rows[0][name]["miou"] != rows[1][name]["miou"] and 0 <= rows[1][name]["miou"] <= 1


def test_ablation_table_shows_every_training_seed_and_the_mean(bench):
    ablation = bench("ablation")
    runs = [{"name": "top-K", "preset": "demo/tkp", "overrides": "", "train_seed": s, "val_miou": v,
             "bg_threshold": None, "train_s": 10.0, "label_s": 2.0} for s, v in ((0, 0.4), (1, 0.6))]
    text = ablation.markdown("tkp:seed1", [runs], "python benchmarks/ablation.py tkp")
    (line,) = [x for x in text.splitlines() if x.startswith("| top-K")]
    assert "| 0.5000 |" in line and "0: 0.400, 1: 0.600" in line
    assert text.startswith("<!-- ablation:tkp:seed1 -->") and text.endswith("<!-- /ablation:tkp:seed1 -->\n")


def test_ablation_segment_suite_tables_train_miou_and_needs_pseudo_masks(bench, tmp_path, monkeypatch):
    ablation = bench("ablation")
    runs = [{"name": "stage 2", "preset": "demo/segment", "overrides": "", "train_seed": 0, "val_miou": 0.7,
             "train_miou": 0.75, "bg_threshold": None, "train_s": 10.0, "label_s": 2.0}]
    text = ablation.markdown("segment:seed0", [runs], "python benchmarks/ablation.py segment")
    assert "| train mIoU |" in text.splitlines()[4] and "| 0.750 |" in text
    monkeypatch.setattr("sys.argv", ["ablation.py", "segment", "--work", str(tmp_path), "--pseudo", str(tmp_path / "no")])
    with pytest.raises(SystemExit):  # a clear usage error before any data is made or run trained
        ablation.main()
    assert not any(tmp_path.iterdir())


def test_usage_cnn_premise_rows_and_table(bench, tmp_path, capsys):
    # issue 19's script at its tiniest: a GAP row and a bounded negative-tau row, then the table
    mod = bench("usage_cnn_premise")
    mod.main(["e1", "--tiny", "--work", str(tmp_path), "--epochs", "1", "--taus", "-4", "inf", "--modes", "scaled"])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["extra"] for r in rows] == ["method.tau=-4.0 method.tau_mode=scaled", "method.tau=inf method.tau_mode=plain"]
    for r in rows:
        assert 0 <= r["val_miou"] <= 1 and 0 <= r["val_fg_fraction"] <= 1 and r["best_threshold"] in mod.THRESHOLDS
        assert 0 <= r["train_recall_lt_precision"] <= 1 and r["protocol"]["split"] == "val" and r["protocol"]["bg_threshold_chosen"] == "swept on train"
    assert rows[1]["alpha_entropy"] == 1.0 and 0 < rows[0]["alpha_entropy"] <= 1  # GAP's weights are uniform
    capsys.readouterr()
    mod.main(["table", "--work", str(tmp_path)])
    assert "| e1 | small_os8 | tuning | method.tau=-4.0 method.tau_mode=scaled |" in capsys.readouterr().out


def test_usage_cnn_premise_e0_setting_families(bench, monkeypatch, capsys):
    # a setting that names its own family (large objects) is judged there; the others on --family
    mod = bench("usage_cnn_premise")
    seen = []
    monkeypatch.setattr(mod, "run_row", lambda exp, setting, fam, *a, **k: seen.append((exp, setting, fam)) or {})
    mod.main(["e0", "--settings", "large_os8", "small_os8"])
    assert seen == [("e0", "large_os8", "tuning_large"), ("e0", "small_os8", "tuning")]
    assert "--object-scale" in mod.FAMILIES["tuning_large"] and "large_os8" in mod.SETTINGS
    capsys.readouterr()


def test_family_table_cells_and_markdown(bench, tmp_path, monkeypatch):
    """The grid runner: a scored cell is read back, not redone (resumable), and the table gives mean +- sd
    over seeds with each seed's value and the predicted foreground range."""
    ft = bench("family_table")
    assert set(ft.FAMILIES) >= {"F0", "F1", "F3", "F4"} and "segment" in ft.PRESETS
    for seed, miou, fg in ((0, 0.5, 0.2), (1, 0.7, 0.3)):
        out = tmp_path / "work" / "F3" / f"tkp_s{seed}" / "pseudo"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"miou": miou, "diagnostics": {"foreground_fraction": fg, "alarm": None}}))
    monkeypatch.setattr(ft, "make_family", lambda name, data: tmp_path / name)
    monkeypatch.setattr(ft, "_wsss", lambda *a, **k: pytest.fail("a scored cell must not be rerun"))
    rows = [ft.cell("F3", "tkp", s, tmp_path, tmp_path / "work", []) for s in (0, 1)]
    text = ft.table(rows, ["F0", "F3"], ["tkp", "vit_pcm"])
    assert "| `demo/tkp` | not run | **0.600** +- 0.141 (n=2: 0.500, 0.700; fg 20%-30%) |" in text
    assert "| `demo/vit_pcm` | not run | not run |" in text and "F0 (tuning)" in text and "F3 (held out)" in text



def test_family_table_absent_mode_rescores_the_trained_run(bench, tmp_path, monkeypatch):
    """--absent MODE: the trained run is reused (only continued from its last.pt, which is a no-op on a
    finished run) and scored into RUN/pseudo_MODE with `pseudo-label --absent MODE`; stage 2 (segment)
    ignores it."""
    ft = bench("family_table")
    run = tmp_path / "work" / "F4" / "tkp_pcl_s0"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")
    calls = []

    def fake_wsss(*args, log):
        calls.append(args)
        if args[0] == "train":
            return
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"miou": 0.4, "diagnostics": {"foreground_fraction": 0.1}}))

    monkeypatch.setattr(ft, "make_family", lambda name, data: tmp_path / name)
    monkeypatch.setattr(ft, "_wsss", fake_wsss)
    row = ft.cell("F4", "tkp_pcl", 0, tmp_path, tmp_path / "work", [], absent="won")
    assert row["miou"] == 0.4 and (run / "pseudo_won" / "summary.json").is_file()
    assert [c[0] for c in calls] == ["train", "pseudo-label"] and "--resume" in calls[0]
    assert Path(calls[0][calls[0].index("--out") + 1]) == run and calls[1][-2:] == ("--absent", "won")


def test_false_positive_where_puts_each_pixel_in_its_place(bench, tmp_path):
    """A 100 x 100 image, one object of class 1 and one of class 2: false positives of class 1 drawn (a) as
    a rim around its own object, (b) touching the class-2 object, (c) in a far corner are counted there."""
    import numpy as np
    from PIL import Image

    fpw = bench("false_positive_where")
    gt = np.zeros((100, 100), np.uint8)
    gt[20:40, 20:40] = 1
    gt[20:40, 60:80] = 2
    gt[0, :] = 255  # ignored row: never counted
    pred = gt.copy()
    pred[0, :] = 1
    pred[18:20, 20:40] = 1  # rim of its own object (within 5 px)
    pred[42:44, 60:80] = 1  # just below the class-2 object, 20 px from its own
    pred[90:100, 90:100] = 1  # far from both
    pred[30:40, 30:40] = 0  # a quarter of object 1 missed
    (tmp_path / "data" / "SegmentationClass").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    Image.fromarray(gt).save(tmp_path / "data" / "SegmentationClass" / "a.png")
    Image.fromarray(pred).save(tmp_path / "masks" / "a.png")
    Image.fromarray(pred).save(tmp_path / "masks" / "b.png")  # no ground truth: skipped
    t = fpw.tally(tmp_path / "data", tmp_path / "masks")
    assert t == {"tp": 700, "gt_fg": 800, "near_own": 40, "near_other": 40, "far": 100}
    Image.fromarray(pred[:50]).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match="a.png"):
        fpw.tally(tmp_path / "data", tmp_path / "masks")


def test_extension_pairs_reads_the_deciding_check_and_compares_both_weights(bench, tmp_path, monkeypatch, capsys):
    """extension_pairs: per extended run, the check of the epoch that extended and the val mIoU of the
    first schedule's weights beside the final ones; runs that never extended are left out."""
    ep = bench("extension_pairs")
    run = tmp_path / "work" / "F4" / "cam_vit_s1"
    (run / "pseudo").mkdir(parents=True)
    (run / "first_schedule.pt").write_bytes(b"")
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"epoch": 1}, {"epoch": 2, "extended": True, "masks": {"top_hit_rate": 0.75, "top_hit_chance": 0.25}},
        {"epoch": 3})) + "\n")
    (run / "pseudo" / "summary.json").write_text(json.dumps({"miou": 0.2, "diagnostics": {"foreground_fraction": 0.4}}))
    plain = tmp_path / "work" / "F4" / "cam_vit_s0"  # not extended: no first_schedule.pt, no row
    plain.mkdir()
    (plain / "log.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert ep.check_at_extension(plain) is None and ep.check_at_extension(run)["top_hit_rate"] == 0.75

    def fake_score(r, data):
        assert r == run and data == tmp_path / "data" / "F4"
        (r / "pseudo_first").mkdir(exist_ok=True)
        (r / "pseudo_first" / "summary.json").write_text(json.dumps({"miou": 0.25, "diagnostics": {"foreground_fraction": 0.2}}))
        return r / "pseudo_first" / "summary.json"

    monkeypatch.setattr(ep, "score_first_schedule", fake_score)
    monkeypatch.setattr(sys, "argv", ["extension_pairs", "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data")])
    ep.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| F4")]
    assert rows == ["| F4/cam_vit_s1 | 75% (25%) | 0.67 | 0.250 (20%) | 0.200 (40%) | -5.0 |"]


def _one_image_family(root):
    """A family root with one 1x4 ground-truth mask, a.png: [[2, 1, 1, 0]]."""
    from wsss.io import write_mask

    (root / "SegmentationClass").mkdir(parents=True)
    write_mask(root / "SegmentationClass" / "a.png", np.array([[2, 1, 1, 0]], np.uint8))


def _fake_masks(out, miou, mask):
    """What a `wsss pseudo-label` / `refine` call leaves: OUT/a.png and a summary naming three classes."""
    from wsss.io import write_mask

    out.mkdir(parents=True)
    write_mask(out / "a.png", np.array(mask, np.uint8))
    per_class = dict.fromkeys(["background", "one", "two"], {})
    (out / "summary.json").write_text(json.dumps({"miou": miou, "bg_threshold": 0.4, "per_class": per_class}))


def test_refine_table_cell_commands_and_paired_gain(bench, tmp_path, monkeypatch):
    """A refine cell runs the CRF masks, the seed maps and `wsss refine` on the family table's stage-1 run
    (overrides and the named folders only with --name), then reads them back without rerunning; the table
    gives the paired refined - CRF difference of each seed."""
    rt = bench("refine_table")
    calls = []
    _one_image_family(tmp_path / "F3")

    def fake_wsss(*args, log):
        calls.append(args)
        if args[0] == "train":
            return
        out = Path(args[args.index("--out") + 1])
        miou = {"pseudo-label": 0.7 if "--crf" in args else 0.5, "refine": 0.75}[args[0]]
        _fake_masks(out, miou, [[2, 2, 0, 0]] if args[0] == "refine" else [[0, 1, 1, 0]])

    monkeypatch.setattr(rt, "make_family", lambda name, data: tmp_path / name)
    monkeypatch.setattr(rt, "_train", lambda *a: None)
    monkeypatch.setattr(rt, "_wsss", fake_wsss)
    work = tmp_path / "work"
    row = rt.refine_cell("F3", "cam_cnn", 0, tmp_path, work, (), ["method.alpha_crossings=[1,0.5]"], "x")
    assert [c[0] for c in calls] == ["pseudo-label", "pseudo-label", "refine"]
    refine_call = calls[2]
    assert refine_call[1] == str(work / "F3" / "cam_cnn_s0" / "refine_affinity_x")
    assert "method.alpha_crossings=[1,0.5]" in refine_call and "train.seed=0" in refine_call
    assert (row["crf"], row["seeds"], row["refined"], row["refine"]) == (0.7, 0.5, 0.75, "x")
    # fill: the CRF's class 1 kept on its two pixels, the walk's class 2 on the CRF's background where it
    # says so, the ground truth exactly (the walk alone, [[2, 2, 0, 0]], and the CRF alone each miss a part)
    from wsss.io import read_mask

    fill = work / "F3" / "cam_cnn_s0" / "refine_train_x_fill"
    assert read_mask(fill / "a.png").tolist() == [[2, 1, 1, 0]] and row["fill"] == pytest.approx(1.0)
    # relabel: the walk's extent ([[2, 2, 0, 0]]), the CRF's class 1 where both draw foreground
    relabel = work / "F3" / "cam_cnn_s0" / "refine_train_x_relabel"
    assert read_mask(relabel / "a.png").tolist() == [[2, 1, 0, 0]] and 0 < row["relabel"] < row["fill"]
    disagree = json.loads((fill / "summary.json").read_text())["crf_foreground_disagreements"]
    assert disagree == {"walk_background": {"pixels": 1, "crf_right": 1.0}, "walk_other_class": {"pixels": 1, "crf_right": 1.0}}
    monkeypatch.setattr(rt, "_wsss", lambda *a, **k: pytest.fail("a finished cell must not be rerun"))
    again = rt.refine_cell("F3", "cam_cnn", 0, tmp_path, work, (), ["method.alpha_crossings=[1,0.5]"], "x")
    assert again == row
    text = rt.table([row, {**row, "seed": 1, "crf": 0.8, "refined": 0.78, "fill": 0.9}])
    assert "| F3 (held out) | `demo/cam_cnn` | x | 0, 1 |" in text and "+1.5 (+5.0, -2.0)" in text
    assert "+20.0 (+30.0, +10.0)" in text


def test_refine_table_segment_on_a_cam_preset_trains_stage2_on_both_mask_sets(bench, tmp_path, monkeypatch):
    """--segment on a preset other than tkp_pcl: stage 2 on the run's CRF masks and on its refined masks, each
    into a folder named after the preset, and both val scores in the row (read back, not retrained)."""
    rt = bench("refine_table")
    _one_image_family(tmp_path / "F3")

    def fake_wsss(*args, log):
        out = Path(args[args.index("--out") + 1])
        _fake_masks(out, 0.7 if "--crf" in args else 0.5, [[0, 1, 1, 0]])

    trained = []

    def fake_stage2(root, masks, seed, run, extra):
        trained.append((masks.name, run.name))
        (run / "pseudo").mkdir(parents=True)
        miou = {"pseudo_train_crf": 0.6, "refine_train": 0.65}.get(masks.name, 0.7)
        (run / "pseudo" / "summary.json").write_text(json.dumps({"miou": miou}))

    monkeypatch.setattr(rt, "make_family", lambda name, data: tmp_path / name)
    monkeypatch.setattr(rt, "_train", lambda *a: None)
    monkeypatch.setattr(rt, "_wsss", fake_wsss)
    monkeypatch.setattr(rt, "stage2", fake_stage2)
    work = tmp_path / "work"
    row = rt.refine_cell("F3", "usage_vit", 2, tmp_path, work, rt.SEGMENT_MASKS)
    assert trained == [("pseudo_train_crf", "segment_crf_usage_vit_s2"), ("refine_train", "segment_refined_usage_vit_s2"),
                       ("refine_train_fill", "segment_fill_usage_vit_s2"),
                       ("refine_train_relabel", "segment_relabel_usage_vit_s2")]
    assert (row["segment_crf"], row["segment_refined"], row["segment_fill"]) == (0.6, 0.65, 0.7)
    assert rt.refine_cell("F3", "usage_vit", 2, tmp_path, work, rt.SEGMENT_MASKS) == row and len(trained) == 4
    only = rt.refine_cell("F3", "usage_vit", 1, tmp_path, work, ("fill",))  # one mask set asked for: one stage 2
    assert trained[4:] == [("refine_train_fill", "segment_fill_usage_vit_s1")] and "segment_crf" not in only
    assert "| **0.600** | **0.650** | **0.700** |" in rt.table([row])


def test_extent_sweep_moves_the_background_decision_and_calibrates_on_the_crf(bench, tmp_path, capsys):
    """Saved maps of one 1x4 image: background 0.5 everywhere, the tagged class 0.9, 0.6, 0.4, 0.1. At p = 1 the
    class wins two pixels; at p = 0.5 the background is 0.71 and it wins one, as in the ground truth; the
    CAM-style threshold at 0.5 gives two. The CRF masks say one pixel, so --calibrate picks p = 0.5."""
    import numpy as np
    from PIL import Image

    es = bench("extent_sweep")
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "SegmentationClass").mkdir(parents=True)
    Image.fromarray(np.array([[2, 0, 0, 0]], np.uint8)).save(data / "SegmentationClass" / "a.png")
    (run / "classes.json").parent.mkdir()
    (run / "classes.json").write_text(json.dumps(["background", "x", "y"]))
    probs = np.array([[[0.5] * 4], [[0.9, 0.6, 0.4, 0.1]]], np.float16)
    for folder in ("pseudo_maps", "calib_maps"):
        (run / folder / "maps").mkdir(parents=True)
        np.savez(run / folder / "maps" / "a.npz", probs=probs, classes=np.array([0, 2], np.int16))
    (run / "calib_crf").mkdir()
    Image.fromarray(np.array([[2, 0, 0, 0]], np.uint8)).save(run / "calib_crf" / "a.png")

    res = es.sweep(data, run / "pseudo_maps", "power", [1.0, 0.5])
    assert res[1.0][1] == 0.5 and res[0.5][1] == 0.25  # foreground share: 2 then 1 of 4 pixels
    assert res[1.0][0] == pytest.approx((2 / 3 + 1 / 2) / 2) and res[0.5][0] == pytest.approx(1.0)
    assert es.sweep(data, run / "pseudo_maps", "threshold", [0.5])[0.5][1] == 0.5
    assert es.calibrated_power(run, [1.0, 0.5]) == 0.5
    es.main([str(data), str(run / "pseudo_maps"), "--calibrate", "--values", "1", "0.5"])
    assert "| 0.5 |" in capsys.readouterr().out


def test_extent_sweep_component_mode_drops_the_weaker_regions_of_a_class(bench, tmp_path):
    """One 1x7 image, class 2 wins two regions (peaks 0.9 and 0.6) apart: r = 0.5 keeps both, r = 0.8 sends
    the weaker one to the background, which is what the ground truth says."""
    from PIL import Image

    es = bench("extent_sweep")
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "SegmentationClass").mkdir(parents=True)
    Image.fromarray(np.array([[2, 2, 0, 0, 0, 0, 0]], np.uint8)).save(data / "SegmentationClass" / "a.png")
    (run / "pseudo_maps" / "maps").mkdir(parents=True)
    (run / "classes.json").write_text(json.dumps(["background", "x", "y"]))
    probs = np.array([[[0.5] * 7], [[0.9, 0.8, 0.1, 0.1, 0.6, 0.55, 0.1]]], np.float16)
    np.savez(run / "pseudo_maps" / "maps" / "a.npz", probs=probs, classes=np.array([0, 2], np.int16))

    res = es.sweep(data, run / "pseudo_maps", "component", [0.0, 0.5, 0.8])
    assert res[0.0][1] == pytest.approx(4 / 7) and res[0.5][1] == pytest.approx(4 / 7)
    assert res[0.8][1] == pytest.approx(2 / 7) and res[0.8][0] == pytest.approx(1.0)


def test_refine_headroom_splits_the_crf_errors_and_puts_each_kind_right(bench, tmp_path):
    """The CRF masks' wrong pixels by kind (near / far false foreground, missed, confused), one oracle per kind
    that puts only that kind right from the ground truth, and what the walk does on the CRF's background."""
    from wsss.io import write_mask
    from wsss.postprocess.affinity import MERGES

    rh = bench("refine_headroom")
    root, run = tmp_path / "F3", tmp_path / "runs" / "cam_cnn_s0"
    gt = np.array([[1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
    crf = np.array([[1, 0, 1, 2, 2, 0, 0, 0, 0, 0, 0, 2]], np.uint8)  # missed, confused, near, far: one each
    walk = np.array([[1, 1, 2, 2, 0, 0, 0, 0, 1, 0, 0, 0]], np.uint8)  # recovers the missed pixel, adds one far
    (root / "SegmentationClass").mkdir(parents=True)
    write_mask(root / "SegmentationClass" / "a.png", gt)
    assert rh.oracle("missed", crf, gt).tolist() == [[1, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 2]]
    assert rh.oracle("false_fg", crf, gt).tolist() == [[1, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert rh.oracle("confused", crf, gt).tolist() == [[1, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 2]]
    assert rh.cell(root, run) is None  # no masks yet: skipped, not an error
    (run / "pseudo_train_maps").mkdir(parents=True)  # seeds cut at a threshold: `auto` ships fill
    (run / "pseudo_train_maps" / "summary.json").write_text(json.dumps({"protocol": {"bg_threshold": 0.5}}))
    _fake_masks(run / "pseudo_train_crf", 0.5, crf.tolist())
    _fake_masks(run / "refine_train", 0.55, walk.tolist())
    _fake_masks(run / "refine_train_fill", 0.6, MERGES["fill"](crf, walk).tolist())
    row = rh.cell(root, run)
    assert row["errors"] == pytest.approx(dict.fromkeys(rh.KINDS, 1 / 12))
    assert (row["walk_recovers"], row["walk_adds"], row["walk_adds_far"]) == pytest.approx((1.0, 1 / 12, 1.0))
    miou = row["miou"]
    assert (miou["walk"], miou["shipped"]) == (0.55, 0.6)  # read from the summaries refine_table wrote
    assert all(miou[k] > miou["crf"] for k in rh.ORACLES)
    text = rh.table({("F3", "cam_cnn"): [row]})
    assert "| F3 (held out) | `demo/cam_cnn` | 1 |" in text and "(fill)" in text and "100% / 8.3 (100% far) | 1.00 |" in text


def test_mask_breakdown_splits_by_classes_in_the_image_and_extent_from_class(bench, tmp_path, capsys):
    """Image a holds one class, masked exactly; image b holds two, found in full but with the second
    object called by the first's name: the loss shows in the 2-class row and in `class_accuracy`, not in
    the foreground's extent."""
    from conftest import make_voc_dataset
    from wsss.io import write_mask

    root = make_voc_dataset(tmp_path, ids=["a", "b", "c"], class_names=["background", "one", "two"],
                            size=(4, 2), splits={"train": ["c"], "val": ["a", "b", "c"]})
    gt_a = np.array([[0, 1, 1, 0], [0, 1, 1, 0]], np.uint8)
    gt_b = np.array([[1, 1, 2, 2], [0, 0, 0, 255]], np.uint8)
    write_mask(root / "SegmentationClass" / "a.png", gt_a)
    write_mask(root / "SegmentationClass" / "b.png", gt_b)
    masks = tmp_path / "masks"
    write_mask(masks / "a.png", gt_a)
    write_mask(masks / "b.png", np.array([[1, 1, 1, 1], [0, 0, 0, 0]], np.uint8))  # c: no mask, counted
    (row,) = bench("mask_breakdown").main([str(root), str(masks)])
    assert row["images"] == {1: 1, 2: 1, 3: 0} and row["missing"] == 1
    assert row["miou_by_classes"][1] == pytest.approx(1.0) and row["miou_by_classes"][3] is None
    # b alone: background 3/3, one 2/4 (2 right of 4 called one), two 0/2 -> 0.5
    assert row["miou_by_classes"][2] == pytest.approx((1 + 0.5 + 0) / 3)
    # the shared foreground: a 4 of 4 right, b 2 of 4
    assert row["foreground"]["iou"] == pytest.approx(1.0) and row["foreground"]["class_accuracy"] == pytest.approx(6 / 8)
    assert row["miou"] == pytest.approx((1 + 0.75 + 0) / 3)
    out = capsys.readouterr().out
    assert "| 1.000 (1) | 0.500 (1) | - (0) |" in out and "1 ids of val have no mask" in out


def test_extent_calibration_moves_the_knob_each_way_and_picks_the_smallest_sufficient_mask(bench):
    import types

    import torch

    ec = bench("extent_calibration")
    probs = torch.tensor([[[0.5, 0.5, 0.5]], [[0.9, 0.4, 0.1]]])  # background, one class: 1 x 3 pixels
    cam = types.SimpleNamespace(has_background=False)
    patch = types.SimpleNamespace(has_background=True)
    # CAM: the constant background score; a lower one grows the mask
    assert ec.masks_at(cam, [0, 7], probs, 0.3).tolist() == [[7, 7, 0]]
    assert ec.masks_at(cam, [0, 7], probs, 0.8).tolist() == [[7, 0, 0]]
    # patch: the background channel to a power; p > 1 lowers it (values < 1), so the mask grows
    assert ec.masks_at(patch, [0, 7], probs, 1.0).tolist() == [[7, 0, 0]]
    assert ec.masks_at(patch, [0, 7], probs, 2.0).tolist() == [[7, 7, 0]]
    assert probs[0, 0, 0] == 0.5  # the caller's maps are left as they were
    rows = {0.2: {"area": 0.6, "kept_ratio": 0.99}, 0.5: {"area": 0.3, "kept_ratio": 0.96},
            0.8: {"area": 0.1, "kept_ratio": 0.7}}
    assert ec.choose(rows, 0.95) == 0.5  # the smallest area that keeps 95% of the score
    assert ec.choose(rows, 0.5) == 0.8
    assert ec.choose(rows, 1.0) == 0.2  # none reaches it: the largest masks

