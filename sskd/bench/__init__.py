"""Side-by-side benchmarks (pipeline, shuffle, distill, train) and the GPU check: tools on top."""
