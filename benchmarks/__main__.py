"""python -m benchmarks (make bench): run every benchmark and print its ratios, one line a figure.
One benchmark: python -m benchmarks.<loader|buckets|overhead|cache|memory|objectives>.
The last, objectives, trains four U-Net stages side by side (about 45 minutes on 2 quiet cores,
more the first time: it trains the chain's CLIP and VAE once, under outputs/bench-objectives)."""

from benchmarks import buckets, cache, loader, memory, objectives, overhead

if __name__ == "__main__":
    for benchmark in (loader, buckets, overhead, cache, memory):
        benchmark.main()
    objectives.main(["--data", "shapes", "--steps", "1500"])
