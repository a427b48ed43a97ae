"""The same EDPairs fit on one process and over torch.distributed ranks.

    python examples/distributed_fit.py                          # one process
    torchrun --nproc_per_node=2 examples/distributed_fit.py     # two processes (gloo on CPU)

Each rank reads its own contiguous block of the data (here: of a synthetic layer's rows; with
an activation store, ``edpairs.distributed.shard_store(store)``), every statistic is
all-reduced, and every rank ends with the pairs one process gets on all the rows. Both runs
print the same checksum of the fitted filters.
"""

import os

import numpy as np

import edpairs as edp


def main():
    layer = edp.synthetic.make_layer(n_images=20000, n_features=32, n_concepts=6, n_distractors=4, grid=(2, 2),
                                     noise=0.1, train_head=False, seed=0)
    X = layer.X
    group = None
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        import torch.distributed as dist

        dist.init_process_group("gloo")
        group = dist.group.WORLD
        block = edp.distributed.shard_range(len(X), dist.get_rank(), dist.get_world_size())
        X = X[block.start:block.stop]
    pairs = edp.EDPairs(6, random_state=0, progress=False).fit(X, process_group=group)
    rank = 0 if group is None else group.rank()
    print(f"rank {rank}: {len(X)} rows here, {pairs.n_samples_} in the fit, "
          f"filters checksum {float(np.abs(pairs.decoding_).sum()):.4f}")
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
