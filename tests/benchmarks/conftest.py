# Benchmarks are scripts (`make bench`, gpu.sh), not tests: keep pytest out of this folder.
collect_ignore_glob = ["*"]
