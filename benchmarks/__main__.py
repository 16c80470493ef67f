"""python -m benchmarks (make bench): run every benchmark and print its ratios, one line a figure.
One benchmark: python -m benchmarks.<loader|overhead|cache|memory>."""

from benchmarks import cache, loader, memory, overhead

if __name__ == "__main__":
    for benchmark in (loader, overhead, cache, memory):
        benchmark.main()
