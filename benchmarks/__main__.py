"""python -m benchmarks (make bench): run every benchmark and print its ratios, one line a figure.
One benchmark: python -m benchmarks.<loader|buckets|overhead|cache|memory|lora|concept>
(concept: when make demo's exports are there)."""

from benchmarks import buckets, cache, concept, loader, lora, memory, overhead

if __name__ == "__main__":
    for benchmark in (loader, buckets, overhead, cache, memory, lora, concept):
        benchmark.main()
