"""prepare_data: clean roots pass; each kind of bad input gives one clear line, the sample is dropped, the run
goes on; caches and statistics are exact; runs resume; nothing ends in a traceback."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import layout, prepare, spike_dat, voxelize
from data_pipelines.errors import DataError
from helpers import make_tiny_root

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_data.py"


def run_script(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args), "--noprogress", "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("clean") / "root", prepare_it=False)


def _copy(root, tmp_path):
    dst = tmp_path / "root"
    shutil.copytree(root, dst)
    return dst


def test_clean_root_exact_caches_and_train_only_stats(clean_root, tmp_path):
    root = _copy(clean_root, tmp_path)
    check = run_script("--root", root, "--check_only")
    assert check.returncode == 0, check.stderr
    assert not (root / layout.PREPARED_JSON).exists()          # check_only writes nothing
    proc = run_script("--root", root)
    assert proc.returncode == 0, proc.stderr
    assert "kept train: 21 frames in 3 sequences, val: 6 frames in 1 sequences; 0 problem(s)" in proc.stdout
    rows, problems, rejected = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    assert not problems and not rejected and len(rows) == 27
    info = layout.read_dataset_info(root)
    stats = voxelize.VoxelStats(32)
    for (seq, idx), row in rows.items():
        seq_dir = root / seq
        stem = layout.frame_stem(idx)
        spikes = spike_dat.read_dat(seq_dir / "spike" / f"{stem}.dat", 32 // info.spike_scale, 32 // info.spike_scale)
        want = voxelize.count_spikes(spikes, row.frame_times(len(spikes)), row.t0, row.t1, 32)
        cache = np.load(seq_dir / "spike_vox" / f"{stem}.npy")
        assert cache.dtype == np.uint8
        np.testing.assert_array_equal(cache, want)
        assert row.event_count == int(want.sum())
        if seq.startswith("train/"):
            stats.add(want)
    saved = json.loads((root / layout.STATS_JSON).read_text())
    assert saved["split"] == "train" and saved["num_bins"] == 32
    assert (saved["mean"], saved["std"]) == pytest.approx(stats.mean_std(), rel=1e-12)
    assert not list(root.rglob("*.tmp*"))                      # atomic writes leave no temporaries


def test_resume_skips_finished_frames_and_gives_identical_outputs(clean_root, tmp_path):
    root = _copy(clean_root, tmp_path)
    first = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert first.exit_code == 0
    outputs = {p: p.read_bytes() for p in [root / layout.STATS_JSON, root / layout.ALIGNMENT_CSV]}
    prepared = json.loads((root / layout.PREPARED_JSON).read_text())
    # Simulate a crash: two caches never written, the journal cut in the middle of a line.
    victims = sorted(root.glob("val/*/spike_vox/*.npy"))[-2:]   # not among the 10 journal lines kept
    for v in victims:
        v.unlink()
    journal = (root / prepare.JOURNAL).read_text().splitlines()
    (root / prepare.JOURNAL).write_text("\n".join(journal[:10]) + "\n" + journal[10][:25])
    second = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert second.exit_code == 0
    assert any("10 frame(s) unchanged" in n for n in second.notes)
    assert all(v.exists() for v in victims)
    for path, data in outputs.items():
        assert path.read_bytes() == data
    assert json.loads((root / layout.PREPARED_JSON).read_text()) == prepared
    third = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert any("27 frame(s) unchanged" in n for n in third.notes)
    # A changed spike file is noticed: its cache is rebuilt from the new spikes.
    dat = sorted(root.glob("train/*/spike/000001.dat"))[0]
    spikes = ~spike_dat.read_dat(dat, 32, 32)
    spike_dat.write_dat(dat, spikes)
    fourth = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert fourth.exit_code == 0 and any("26 frame(s) unchanged" in n for n in fourth.notes)
    cache = np.load(dat.parent.parent / "spike_vox" / "000001.npy")
    assert cache.sum() == spikes.sum()


def _write_png(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def _break_everything(root: Path):
    """Injects one defect of each kind; returns (expected message fragments, frames that must survive)."""
    seqs = sorted(p.name for p in (root / "train").iterdir())
    s0, s1, s2 = (root / "train" / s for s in seqs)
    expect = []
    # 1. missing sharp folder -> the sequence is dropped, nothing is fabricated
    shutil.rmtree(s1 / "sharp")
    expect.append((str(s1 / "sharp"), "no sharp/ folder"))
    # 2. frame of another size
    _write_png(s0 / "sharp" / "000002.png", np.zeros((24, 32, 3), np.uint8))
    expect.append((str(s0 / "sharp" / "000002.png"), "sharp is 24x32 (HxW), its blurry frame 000002.png is 32x32"))
    # 3. truncated .dat
    dat = s0 / "spike" / "000003.dat"
    dat.write_bytes(dat.read_bytes()[:-5])
    expect.append((str(dat), "not a multiple of 128 bytes per 32x32"))
    # 4/5/12. alignment: missing entry, t1 <= t0, duplicate
    csv_path = root / layout.ALIGNMENT_CSV
    lines = csv_path.read_text().splitlines()
    out = []
    for line in lines:
        fields = line.split(",")
        if fields[4] == f"train/{seqs[0]}" and fields[0] == "4":
            continue
        if fields[4] == f"train/{seqs[0]}" and fields[0] == "5":
            fields[2] = fields[1]
        out.append(",".join(fields))
        if fields[4] == f"train/{seqs[2]}" and fields[0] == "3":
            out.append(",".join(fields))
    csv_path.write_text("\n".join(out) + "\n")
    expect.append((str(s0 / "blur" / "000004.png"), "missing alignment entry"))
    expect.append((str(csv_path), "exposure window needs t1 > t0"))
    expect.append((str(csv_path), f"train/{seqs[2]} frame 3 has two alignment lines"))
    # 6. non-finite voxels (a frame given only as voxels)
    (s2 / "spike" / "000000.dat").unlink()
    vox = np.zeros((32, 32, 32), np.float32)
    vox[0, 0, :3] = np.nan
    (s2 / "spike_vox").mkdir(exist_ok=True)
    np.save(s2 / "spike_vox" / "000000.npy", vox)
    expect.append((str(s2 / "spike_vox" / "000000.npy"), "non-finite voxels: 3 of 32768"))
    # 7. corrupt PNG (valid header, damaged data)
    png = s2 / "blur" / "000001.png"
    data = bytearray(png.read_bytes())
    data[60:160] = bytes(100)
    png.write_bytes(bytes(data))
    expect.append((str(png), "corrupt PNG"))
    # 8. empty sequence
    for sub in ("blur", "sharp", "spike"):
        (root / "train" / "99_empty" / sub).mkdir(parents=True)
    expect.append((str(root / "train" / "99_empty" / "blur"), "empty sequence"))
    # 9. frame-count mismatch between blur and spikes
    (s2 / "spike" / "000006.dat").unlink()
    expect.append((str(s2 / "spike"), "frame-count mismatch: blur/ has 7 frames, spike/ has 5"))
    # 11. spike file that does not cover the exposure window
    dat = s2 / "spike" / "000002.dat"
    dat.write_bytes(dat.read_bytes()[: 128 * 20])
    expect.append((str(dat), "does not cover the exposure window"))
    # 13. a file that is not named by frame number
    shutil.copy(s0 / "blur" / "000000.png", s0 / "blur" / "cover.png")
    expect.append((str(s0 / "blur" / "cover.png"), "named by frame number"))
    survivors = {f"train/{seqs[0]}": [0, 1, 6], f"train/{seqs[2]}": [4, 5]}
    return expect, survivors


def test_every_bad_input_is_one_clear_line_and_the_run_goes_on(clean_root, tmp_path):
    root = _copy(clean_root, tmp_path)
    expect, survivors = _break_everything(root)
    proc = run_script("--root", root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problem_lines = [line for line in proc.stderr.splitlines() if line.startswith("problem: ")]
    for path, fragment in expect:
        hits = [line for line in problem_lines if path in line and fragment in line]
        assert len(hits) == 1, f"expected one line with {path!r} and {fragment!r} in:\n" + "\n".join(problem_lines)
    assert len(problem_lines) == len(expect)
    # The run went on: every good frame prepared, the dropped ones logged in prepare_log.txt.
    prepared = json.loads((root / layout.PREPARED_JSON).read_text())
    kept = {s["name"]: [fr[0] for fr in s["frames"]] for s in prepared["splits"]["train"]}
    assert kept == survivors
    assert [fr[0] for fr in prepared["splits"]["val"][0]["frames"]] == list(range(6))
    log_text = (root / layout.PREPARE_LOG).read_text()
    assert all(fragment in log_text for _, fragment in expect)
    assert (root / layout.STATS_JSON).exists()
    # Nothing fabricated: the sequence without sharp/ still has none, and none of its frames is used.
    no_gt = sorted((root / "train").iterdir())[1]
    assert not (no_gt / "sharp").exists() and f"train/{no_gt.name}" not in kept
    # --check_only reports the same problems (and a stale cache would be one more).
    check = run_script("--root", root, "--check_only")
    assert check.returncode == 1
    assert len([l for l in check.stderr.splitlines() if l.startswith("problem: ")]) == len(expect)


def test_fatal_roots_exit_2_with_one_line(tmp_path, clean_root):
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    proc = run_script("--root", tmp_path / "junk")
    assert proc.returncode == 2
    assert "unknown layout" in proc.stderr and str(tmp_path / "junk") in proc.stderr
    proc = run_script("--root", tmp_path / "nowhere")
    assert proc.returncode == 2 and "root folder not found" in proc.stderr
    root = _copy(clean_root, tmp_path)
    (root / layout.ALIGNMENT_CSV).write_text("frame_idx,t0,t1,event_count,seq\n0,0,31,,train/x\n")
    proc = run_script("--root", root)
    assert proc.returncode == 2 and "lacks column(s) spike_t0" in proc.stderr
    (root / layout.ALIGNMENT_CSV).unlink()
    proc = run_script("--root", root)
    assert proc.returncode == 2 and "alignment log not found" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", root, "--check_only", "--build_tfds"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_parallel_workers_match_serial(clean_root, tmp_path):
    a, b = _copy(clean_root, tmp_path / "a"), _copy(clean_root, tmp_path / "b")
    ra = prepare.prepare_root(prepare.PrepareOptions(root=a, workers=1, progress=False), log=lambda s: None)
    rb = prepare.prepare_root(prepare.PrepareOptions(root=b, workers=2, progress=False), log=lambda s: None)
    assert ra.exit_code == rb.exit_code == 0
    assert (a / layout.STATS_JSON).read_bytes() == (b / layout.STATS_JSON).read_bytes()
    assert (a / layout.ALIGNMENT_CSV).read_bytes() == (b / layout.ALIGNMENT_CSV).read_bytes()


def test_only_decoding_errors_count_as_bad_files(clean_root, tmp_path, monkeypatch):
    """A bug in our code (here a TypeError from the voxeliser) propagates instead of being reported as a bad
    blurry PNG; a corrupt PNG is still one problem naming that file."""
    root = _copy(clean_root, tmp_path)
    png = sorted(root.glob("train/*/blur/000001.png"))[0]
    data = bytearray(png.read_bytes())
    data[60:160] = bytes(100)
    png.write_bytes(bytes(data))
    result = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert result.exit_code == 1
    assert [(p.kind, p.path) for p in result.problems] == [("bad_image", str(png))]
    assert "corrupt PNG (OSError" in result.problems[0].message

    def broken(*args, **kwargs):
        raise TypeError("count_spikes() got an unexpected keyword argument")

    monkeypatch.setattr(voxelize, "count_spikes", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False, overwrite=True), log=lambda s: None)


def test_test_split_is_prepared_but_never_in_the_statistics(clean_root, tmp_path):
    root = _copy(clean_root, tmp_path)
    reference = _copy(clean_root, tmp_path / "ref")
    assert prepare.prepare_root(prepare.PrepareOptions(root=reference, progress=False),
                                log=lambda s: None).exit_code == 0
    # A test split: a copy of the val sequence under test/, with its alignment lines.
    val_seq = next((root / "val").iterdir())
    shutil.copytree(val_seq, root / "test" / val_seq.name)
    rows, _, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    extra = [layout.AlignmentRow(f"test/{val_seq.name}", r.frame_idx, r.t0, r.t1, r.spike_t0, None, r.source)
             for r in rows.values() if r.seq == f"val/{val_seq.name}"]
    layout.write_alignment(root / layout.ALIGNMENT_CSV, list(rows.values()) + extra)
    result = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert result.exit_code == 0, [p.message for p in result.problems]
    assert result.kept_frames == {"train": 21, "val": 6, "test": 6}
    assert "val: 6 frames in 1 sequences, test: 6 frames in 1 sequences;" in prepare.summary_line(result)
    prepared = json.loads((root / layout.PREPARED_JSON).read_text())
    assert [s["name"] for s in prepared["splits"]["test"]] == [f"test/{val_seq.name}"]
    assert prepared["shared_clock"] is True
    assert (root / layout.STATS_JSON).read_bytes() == (reference / layout.STATS_JSON).read_bytes()   # train only
    # A root without test/ is complete (no problem), one without val/ is not.
    assert "test" not in prepare.summary_line(prepare.prepare_root(
        prepare.PrepareOptions(root=reference, progress=False), log=lambda s: None))
    shutil.rmtree(reference / "val")
    missing = prepare.prepare_root(prepare.PrepareOptions(root=reference, progress=False), log=lambda s: None)
    assert ("missing_folder", str(reference / "val")) in [(p.kind, p.path) for p in missing.problems]
    assert not any("test" in p.reason for p in missing.problems)


@pytest.mark.parametrize("source_layout", ["spk_gopro_ssdm", "spk_gopro_spkdeblurnet"])
def test_a_gopro_root_from_the_old_converter_is_refused(tmp_path, source_layout):
    """Before converter version 2, GoPro's test split was stored as val: training on such a root would select
    `best` on the test set. read_prepared (every training and evaluation start) refuses it, naming the fix."""
    manifest = {"format": prepare.PREPARED_FORMAT, "version": prepare.PREPARED_VERSION, "num_bins": 4,
                "spike_scale": 1, "voxel_dtype": "uint8", "tick_rate_hz": 20000.0, "source_layout": source_layout,
                "shared_clock": True, "splits": {"train": [], "val": []}, "num_problems": 0}
    (tmp_path / "prepared.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="before version 2.*convert the source again"):
        prepare.read_prepared(tmp_path)
    manifest["converter_version"] = 2
    (tmp_path / "prepared.json").write_text(json.dumps(manifest))
    assert prepare.read_prepared(tmp_path)["converter_version"] == 2
