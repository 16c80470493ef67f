"""python -m benchmarks (make bench): run every benchmark and print its ratios, one line a figure.
One benchmark: python -m benchmarks.<loader|buckets|overhead|cache|memory>."""

from benchmarks import buckets, cache, loader, memory, overhead

if __name__ == "__main__":
    for benchmark in (loader, buckets, overhead, cache, memory):
        benchmark.main()
