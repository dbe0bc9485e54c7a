"""Speed and quality benchmarks of lightning_gi: ``python -m benchmarks.<name> [--smoke] [--results-dir DIR]``.

Every benchmark writes one JSON envelope (``benchmarks.common.write_result``; read with ``load_result``).
"""
