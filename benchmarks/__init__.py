"""Speed, memory and accuracy benchmarks; each writes JSON and a PNG to benchmarks/results/."""
