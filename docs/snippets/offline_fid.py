"""FID on a machine without internet: point to a local Inception weights file."""

from lightning_memwatch import FID, MemWatch


def offline_watch(test_images):
    # --8<-- [start:fid]
    fid = FID(
        reference=test_images,  # held-out real images, in the same data_range as the samples
        weights_path="/shared/models/weights-inception-2015-12-05-6726825d.pth",  # or the environment variable
        num_samples=10_000,  # generated images per FID (the paper's count); f_mem uses MemWatch's num_samples
        cache_dir="/shared/cache/lightning_memwatch",  # reference statistics, shared by every run and node
    )
    watch = MemWatch(num_samples=10_000, sample_batch_size=500, fid=fid)
    # --8<-- [end:fid]
    return watch
