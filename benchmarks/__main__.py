"""python -m benchmarks (make bench): run the quick benchmarks and print their ratios, one line a
figure. One benchmark: python -m benchmarks.<loader|buckets|overhead|cache|memory|lora|concept>
(concept: when make demo's exports are there). Not run here, for it trains four U-Net stages
side by side (about 45 minutes on 2 quiet cores at 1500 steps): python -m benchmarks.objectives."""

from benchmarks import buckets, cache, concept, loader, lora, memory, overhead

if __name__ == "__main__":
    for benchmark in (loader, buckets, overhead, cache, memory, lora, concept):
        benchmark.main()
