"""python -m benchmarks (make bench): run every benchmark and print its ratios."""

from benchmarks import loader

if __name__ == "__main__":
    loader.main()
