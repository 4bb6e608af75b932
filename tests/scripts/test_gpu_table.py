"""scripts/gpu_table.py on a saved bench_decoder_cuda JSON file (tests/scripts/data: synthetic
values in Google Benchmark's JSON layout, 3 repetitions and their aggregates, not a measurement):
medians, GB/s of the compressed bytes, % of the peak bandwidth, speed-up against dense bf16 and
spread; clear errors for files that are not benchmark output. Standard library only (no pytest),
run by CTest (scripts_gpu_table)."""
import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
import gpu_table  # noqa: E402

SAMPLE = os.path.join(HERE, "data", "bench_decoder_cuda_sample.json")


def run(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpu_table.main(list(args))
    return code, out.getvalue()


def row(text, prefix):
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, text)
    return [c.split() for c in lines[0].split("|")]


class GpuTable(unittest.TestCase):
    def test_shape_rows(self):
        code, text = run(SAMPLE)
        self.assertEqual(code, 0)
        self.assertIn("peak DRAM bandwidth 3352 GB/s", text)
        self.assertIn("compute capability 9.0", text)
        self.assertIn("median of 3 repetition(s)", text)
        # 768x3072, 1 token. qmoe-v1: 10, 12, 11 us -> 11.0; 236000 B / 11 us = 21 GB/s = 0.6%.
        # qmoe-v2: 9, 9.5, 10 -> 9.5 us, 212000 B -> 22 GB/s. Dense bf16: 4, 4, 4.2 -> 4.0 us,
        # 4718592 B -> 1180 GB/s = 35.2%. Fastest qmoe (v2) vs bf16: 4.0 / 9.5 = 0.42x; its spread
        # (10 - 9) / 9.5 = 10.5%.
        cells = row(text, "768x3072                 1")
        self.assertEqual(cells[1], ["11.0", "21", "0.6"])
        self.assertEqual(cells[2], ["9.5", "22", "0.7"])
        self.assertEqual(cells[3], ["31.0"])
        self.assertEqual(cells[4], ["4.0", "1180", "35.2"])
        self.assertEqual(cells[5], ["0.42x", "10.5%"])
        cells = row(text, "3072x768                32")
        self.assertEqual(cells[1], ["22.0", "11", "0.3"])
        self.assertEqual(cells[4], ["8.0", "590", "17.6"])
        # The bench's order (768x3072 first), not sorted by name.
        self.assertLess(text.index("768x3072 "), text.index("3072x768 "))

    def test_grouped_rows(self):
        _, text = run(SAMPLE)
        # 28 active experts x 236000 B in 100 us = 66 GB/s; dense 205 us -> 2.05x.
        cells = row(text, "    32     no")
        self.assertEqual(cells[1], ["100.0", "66", "2.0"])
        self.assertEqual(cells[2], ["205.0", "644", "19.2"])
        self.assertEqual(cells[3], ["2.05x"])
        self.assertEqual(row(text, "    32    yes")[3], ["1.86x"])

    def test_peak_override_and_aggregates_only(self):
        _, text = run(SAMPLE, "--peak-gbps", "2000")
        self.assertEqual(row(text, "768x3072                 1")[4], ["4.0", "1180", "59.0"])
        # Only the aggregates (--benchmark_report_aggregates_only): the median entries are used.
        with open(SAMPLE, encoding="utf-8") as f:
            data = json.load(f)
        data["benchmarks"] = [b for b in data["benchmarks"] if b["run_type"] == "aggregate"]
        del data["context"]["gpu_peak_memory_GBps"]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "agg.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)
            _, text = run(path)
        self.assertIn("peak DRAM bandwidth unknown", text)
        cells = row(text, "768x3072                 1")
        self.assertEqual(cells[1], ["11.0", "21", "-"])
        self.assertEqual(cells[5], ["0.42x", "-"])

    def test_bad_files(self):
        with tempfile.TemporaryDirectory() as d:
            for name, content, message in [
                ("empty.json", "", "cannot read a benchmark JSON file"),
                ("list.json", "[1, 2]", "no 'benchmarks' list"),
                ("other.json", '{"benchmarks": [{"name": "BM_x", "run_name": "BM_x", "real_time": 1,'
                               ' "time_unit": "ns"}]}', "no bench_decoder_cuda results"),
            ]:
                path = os.path.join(d, name)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(content)
                with self.assertRaises(SystemExit) as e:
                    run(path)
                self.assertIn(message, str(e.exception.code), name)
            with self.assertRaises(SystemExit) as e:
                run(os.path.join(d, "missing.json"))
            self.assertIn("missing.json", str(e.exception.code))


if __name__ == "__main__":
    unittest.main()
