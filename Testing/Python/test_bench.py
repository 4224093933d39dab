"""The benchmark runs on the CPU on a tiny configuration (benchmarks are not tests: no timings are checked)."""

import json

from FastSAM3DLib import roi, session
from FastSAM3DLib.bench import main


def test_benchmark_runs_on_the_cpu_on_a_tiny_config(tmp_path):
    before = session.Engine.decode, roi.logits_to_patch
    result = main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--reference", str(tmp_path / "none")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["environment"]["device"].startswith("CPU") and saved["rows"] == result["rows"]
    stages = {row["stage"] for row in saved["rows"]}
    assert {"encoder", "decoder, 1 point", "decoder, 4 points", "decoder + 128^3 upsample",
            "click-to-mask (1 click)", "click-to-mask (2 clicks)", "paste-back"} <= stages
    for row in saved["rows"]:
        assert row["ms"] is None or row["ms"] > 0
        if row["err"] is not None:
            assert row["err"] == 0                          # the fp32 eager variant is the reference
        if row["dice"] is not None:
            assert row["dice"] == 1.0
    assert any("reference" in key for key in saved["skipped"])   # a missing copy is reported, not fatal
    table = (tmp_path / "bench.md").read_text()
    assert "| model | stage | variant |" in table and table.count("\n| tiny |") == len(saved["rows"])
    assert (session.Engine.decode, roi.logits_to_patch) == before    # measured, not patched


def test_benchmark_accuracy_rule_on_a_real_case(tmp_path, shared_data):
    result = main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-engine",
                   "--cases", str(shared_data / "train" / "MANIFEST.json"),
                   "--case-names", "mri_spine_cord_sct_t2", "--labels-per-case", "1"])
    rows = [r for r in result["rows"] if r["stage"].startswith("real cases")]
    assert [r["variant"] for r in rows] == ["eager fp32"] and rows[0]["dice"] == 1.0   # the CPU: fp32 only
    assert rows[0]["note"].startswith("1 targets of 1 cases")
