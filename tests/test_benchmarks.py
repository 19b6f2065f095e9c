"""The throughput benchmark runs end to end and reports what it measured.

It makes no timing claim (timings belong to the benchmark's own output); it
checks that the benchmark still runs against the engine's current API.
"""

import json

from benchmarks import sweep_throughput


def test_sweep_throughput_benchmark_writes_its_rows(tmp_path):
  out = tmp_path / "bench.json"
  result = sweep_throughput.main(["--models", "mlp", "--configs", "2",
                                  "--steps", "2", "--repeats", "1",
                                  "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] == result["rows"]
  kinds = [(r["kind"], r["strategy"], r["chosen"]) for r in saved["rows"]]
  assert kinds == [("sequential", "scan/vmap", True),
                   ("sweep", "scan/vmap", True)]
  sweep_row = saved["rows"][1]
  assert sweep_row["target"] == 1.5 and isinstance(sweep_row["pass"], bool)
  assert all(r["seconds"] > 0 and r["examples_per_s"] > 0
             for r in saved["rows"])
  assert saved["cpu_devices"] >= 1
