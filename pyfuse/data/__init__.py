"""Task data: the paper's benchmarks (vision, GLUE) and the embedded offline text benchmark."""
