"""python -m benchmarks (make bench): run every benchmark and print its ratios, one line a figure.
One benchmark: python -m benchmarks.<loader|buckets|overhead|cache|memory|lora|concept|objectives>
(concept: when make demo's exports are there). The last, objectives, trains four U-Net stages side
by side (about 45 minutes on 2 quiet cores, more the first time: it trains the chain's CLIP and VAE
once, under outputs/bench-objectives)."""

from benchmarks import buckets, cache, concept, loader, lora, memory, objectives, overhead

if __name__ == "__main__":
    for benchmark in (loader, buckets, overhead, cache, memory, lora, concept):
        benchmark.main()
    objectives.main(["--data", "shapes", "--steps", "1500"])
