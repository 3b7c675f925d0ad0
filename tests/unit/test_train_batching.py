"""Which rows go into which step, process and micro-batch: deterministic from (seed, epoch)."""

from lorakit.train.batching import epoch_batches, micro_batches, process_share, steps_per_epoch, trained_tokens


def test_an_epoch_covers_every_row_once_and_depends_only_on_seed_and_epoch():
    batches = epoch_batches(10, 4, seed=3, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
    assert epoch_batches(10, 4, seed=3, epoch=0) == batches
    assert epoch_batches(10, 4, seed=3, epoch=1) != batches
    assert epoch_batches(10, 4, seed=4, epoch=0) != batches
    assert steps_per_epoch(10, 4) == 3


def test_process_shares_and_micro_batches_partition_a_global_batch():
    indices = list(range(10, 17))  # 7 rows on 2 processes: 4 + 3
    shares = [process_share(indices, rank, 2) for rank in range(2)]
    assert shares == [[10, 11, 12, 13], [14, 15, 16]]
    assert process_share([1], 1, 2) == []  # a short last batch can leave a process without rows
    assert micro_batches(shares[0], 3) == [[10, 11, 12], [13]]


def test_trained_tokens_counts_labels_after_the_causal_shift():
    assert trained_tokens({"labels": [5, 6, -100, 7]}) == 2  # the first label is never predicted
    assert trained_tokens({"labels": 2}) == 1  # a class label
