"""One module per section of RESULTS.md: each has a `HEADING` and a `run(settings)` that prints and returns its
Markdown lines. `benchmarks.run_benchmarks` lists them in the order RESULTS.md shows them."""
