"""The per-job benchmark table: Snakemake's TSVs read in finish order, totals, and a clear error on a stray file."""

from __future__ import annotations

import os

import pytest

from crossdiff import stage_times

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(folder, name, seconds, rss_mb, mtime):
    path = folder / f"{name}.tsv"
    path.write_text(HEADER + f"{seconds}\t0:00:{int(seconds):02d}\t{rss_mb}\t1.0\t1.0\t1.0\t0\t0\t50\t1.0\n")
    os.utime(path, (mtime, mtime))


def test_rows_follow_finish_order_and_totals_sum_time_and_take_peak_memory(tmp_path):
    _bench(tmp_path, "train_crosscoder-l1", 30.5, 2048, 200)
    _bench(tmp_path, "build_corpus", 4.0, 512, 100)
    table = stage_times.read(tmp_path)
    assert table["job"].to_list() == ["build_corpus", "train_crosscoder-l1"]
    assert table["peak_rss_gib"].to_list() == [0.5, 2.0]
    assert stage_times.totals(table) == {"seconds": 34.5, "wall_seconds": 200 - (100 - 4.0), "peak_rss_gib": 2.0}
    md = stage_times.markdown(table)
    assert "| build_corpus | 0:04 | 0.50 |" in md and "**0:34**" in md and "**1:44**" in md


def test_wall_time_is_less_than_the_sum_when_jobs_overlap(tmp_path):
    _bench(tmp_path, "train_crosscoder-l1", 100.0, 900, 1100)         # ran 1000..1100
    _bench(tmp_path, "train_crosscoder-batchtopk", 120.0, 900, 1120)  # ran 1000..1120, side by side
    t = stage_times.totals(stage_times.read(tmp_path))
    assert t["seconds"] == 220.0 and t["wall_seconds"] == 120.0


def test_missing_folder_is_none_and_a_stray_file_is_named(tmp_path):
    assert stage_times.read(tmp_path / "absent") is None
    (tmp_path / "notes.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="notes.tsv"):
        stage_times.read(tmp_path)
