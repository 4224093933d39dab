"""The benchmark runs on the CPU on a tiny configuration (benchmarks are not tests: no timings are checked)."""

import json

from FastSAM3DLib.bench import format_table, main


def test_benchmark_runs_on_the_cpu_on_a_tiny_config(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--tiny", "--device", "cpu", "--json", str(out), "--engine-clicks", "1",
                   "--reference", str(tmp_path / "no-reference-here")])
    saved = json.loads(out.read_text())
    assert saved["environment"]["device"].startswith("CPU")
    stages = {row["stage"] for row in saved["rows"]}
    assert {"encoder", "decoder", "decoder+up128", "click-to-mask", "paste-back"} <= stages
    for row in saved["rows"]:
        assert row["ms"] is None or row["ms"] > 0
        if row["err"] is not None:
            assert row["err"] < 1e-4                        # fp32 on the CPU: the same function
        if row["dice"] is not None:
            assert row["dice"] >= 0.99
    # a missing reference copy is reported, not fatal
    assert any("reference" in key for key in saved["checks"])
    assert "| model | stage |" in format_table(result)
