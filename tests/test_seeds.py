"""derive_seed: one table of strides, with the values the library always used (results stay bit-identical)."""

import pytest

from vqlib.core.seeds import derive_seed


def test_streams_keep_their_historical_values():
    assert derive_seed(3, "codebook_init") == 3 + 0x5EED
    assert derive_seed(3, "head", 2) == 5
    assert derive_seed(3, "level", 2) == 3 + 2 * 7919
    assert derive_seed(3, "quantizer_dropout", 10) == 3 * 100003 + 10
    assert derive_seed(3, "epoch_shuffle", 4) == 3 * 1_000_003 + 4
    assert derive_seed(3, "layer", 1) == 3 + 104729


def test_streams_from_one_seed_do_not_collide():
    seeds = {derive_seed(0, "level", i) for i in range(64)} | {derive_seed(0, "codebook_init")}
    assert len(seeds) == 65
    with pytest.raises(ValueError, match="stream must be"):
        derive_seed(0, "levels")
