"""Data loading on the CPU: SA-1B throughput, where its sample's time goes and its index memory; the other sources.

    python -m benchmarks.data_loader [--images 200] [--image-size 1500x2250] [--masks 50] [--size 1024]
        [--samples 240] [--batch-size 8] [--rounds 2] [--workers 0 1 2] [--breakdown 50]
        [--index-files 10000] [--anns-per-file 100] [--files-per-shard 1000]
        [--refs 100] [--ref-images 40] [--ref-image-size 480x640]
        [--oi-annotations 100] [--oi-image-size 768x1024] [--oi-mask-size 384x512] [--zip-members 170000]
        [--videos 8] [--video-seconds 10] [--video-size 720x1280] [--gop 48] [--x264-preset faster] [--crf 21]
        [--grain 4] [--source-samples 192] [--video-samples 64] [--source-loads 40] [--video-loads 24]
        [--only throughput|index|sources] [--quick]

Everything is written into a temporary folder under /tmp, removed at the end. Section 2 runs first (so its
RSS figures come from a fresh process) and is printed second; section 3 runs last. One module per source
(sa1b.py: sections 1 and 2; refcoco.py, openimages.py, sav.py: their fixtures and sources for section 3,
which other_sources.py runs); common.py holds the picture and blob generators and the measuring tools; the
file formats are written through dualrl.data.fixtures, as the tests' fixtures are. Run from the repository
root.

1. Throughput. `--images` SA-1B-format pictures (sa_<n>.jpg + sa_<n>.json) of `--image-size` (h x w; SA-1B's
   are ~1500 px on the short side), JPEG quality 90 with smooth random blobs and film grain (so the JPEG is
   photo-sized and its decode costs what a photo's does), each with `--masks` COCO-RLE annotations of varied
   size (irregular blobs from 0.05 % to 30 % of the image, drawn from a pool of distinct masks; every mask
   is kept by the default min_area 1024). The index is built (timed: what a training run does when the
   stream first reaches a shard), then `TrainBatches` produces batches of samples squashed to `--size` with
   num_workers = each of `--workers`, plus 0 and the most with torch at 1 thread in this process (when it
   has more; loader workers always run at 1), over the same draws (position 0), `--rounds` times interleaved;
   the best round is shown. The first batch (worker start-up included) is the warm-up, timed apart;
   samples/s is over the `--samples` after it, with the workers busy, so what they prefetched during the
   warm-up adds at most the sample each has in hand. "others" is the share of the machine's CPU time that
   other processes took meanwhile (this machine is shared: a high share means the row was slowed). Then one
   process's breakdown: the decode.py / transforms.py functions that `Sa1bSource.load` calls, timed directly
   on `--breakdown` samples after 3 warm-up loads (mean and median ms per sample).
2. Index memory. A synthetic SA-1B folder of `--index-files` JSON files (only the fields the index builder
   reads, short dummy RLE strings) of `--anns-per-file` annotations each, in sub-folders (shards) of
   `--files-per-shard` files, with empty .jpg placeholders. Every shard is indexed through
   `SourceStream(...).size()`: timed and measured by RSS (psutil, before/after and a 10 ms sampled peak),
   then again from JSON under tracemalloc (peak and held Python allocation), then read back from the
   on-disk cache (`cache_dir`) by a second stream (timed). Index bytes are `Shard.nbytes()` summed over all
   shards (the rows every shard would take if all were held) and over the shards the stream still holds at
   the end (it keeps the last 2, plus one start offset per shard). Baseline, same process and annotations:
   a Python list with one dict {"json": path, "ann": i} per annotation (the path string shared per file),
   sized by tracemalloc and RSS.
3. Other sources, at working size `--size` (squash), through their own `Source.load`:
   - RefCOCO (`refer` layout): `--refs` refs over `--ref-images` COCO-named JPEGs of `--ref-image-size` (q90,
     the pictures of section 1), one object per ref, a COCO polygon of 30-80 vertices (a fifth in two parts),
     1-3 sentences, in instances.json and a Python-2-style refs(unc).p (dualrl.data.fixtures.py2_pickle);
   - OpenImages v7 (published layout): `--oi-annotations` masks over half as many `<ImageID>.jpg` of
     `--oi-image-size` (q90), each a mode-L PNG of `--oi-mask-size` (an irregular blob as in section 1, kept
     over min_area 256 at the image's size) in deflated `train-masks-<c>.zip` by the ImageID's first digit,
     plus the annotation and class CSVs. A zip's member table (`ZipTable`) is built once per loading process
     per zip: the first load of a fresh (pickled) copy of the source is timed apart, every fixture zip's
     table is built before the steady-state timing, and the table of a zip with `--zip-members` empty members
     (the central directory of a published zip, ~170 k members) is timed on its own;
   - SA-V (published layout, sav_000/): `--videos` videos of `--video-size`, `--video-seconds` at 24 fps,
     libx264 (`--x264-preset`, `--crf`; mpeg4 at 4 Mbit/s where PyAV has no libx264), a keyframe every
     `--gop` frames: a panning photo-like background, 3 textured blobs moving a few px per frame and
     temporal grain (`--grain`, sigma in levels), so that the bit rate and the decode cost are a real
     video's; a manual JSON with the 3 objects' RLE masks every 4th frame. Single frames (pairs=0, every
     row) and pairs (pairs=1, the rows with a frame 4 annotations later; frames 4k and 4k+16) apart.
   For each: `Source.load` in this process on `--source-loads` (`--video-loads` for SA-V) draws after 3
   warm-up loads (mean and median ms, samples/s), then `TrainBatches` with num_workers 0 and 2 over
   `--source-samples` (`--video-samples`) samples after a 1-batch warm-up, `--rounds` times interleaved,
   best shown; "others" as in section 1 (one process / workers=0 / workers=2, the worst round).
"""
