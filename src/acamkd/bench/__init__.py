"""Speed and memory benchmarks behind ``acamkd bench``; each prints ratios to its reference."""
