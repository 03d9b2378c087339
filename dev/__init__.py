"""Developer tools. The commands: python dev/bench.py, dev/gpucheck.py, dev/ladder_report.py and dev/corpus.py
(each with --help); op_times.py, profile_parts.py and reference_gpt.py are modules of bench.py."""
