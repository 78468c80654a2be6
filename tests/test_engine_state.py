"""Checkpoint atomicity and RNG capture; the resumable sampler and per-sample seeding."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from acamkd.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from acamkd.engine.sampling import PerSampleSeed, ResumableSampler, mix_seed


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    before = (torch.rand(4), np.random.rand(3), np.random.standard_normal(), random.random())
    save_checkpoint(tmp_path / "ck.pt", {"rng": state})
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])
    after = (torch.rand(4), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert before[2] == after[2] and before[3] == after[3]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def exploding_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_load_refuses_pickled_code_and_names_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(RuntimeError, match="evil.pt.*weights_only"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("length,world", [(10, 1), (10, 3), (7, 4), (1, 2)])
def test_shards_cover_the_dataset_with_equal_counts(length, world):
    samplers = [ResumableSampler(length, seed=5, rank=r, world_size=world) for r in range(world)]
    shards = [s.indices() for s in samplers]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*shards) == set(range(length))
    if length % world == 0:
        assert sorted(sum(shards, [])) == list(range(length))


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(50, seed=1), ResumableSampler(50, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(a) == list(range(50))
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_start_mid_epoch_yields_the_tail():
    sampler = ResumableSampler(20, seed=0, rank=1, world_size=2)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(2, start=11)


class _Noisy(Dataset):
    num_classes = 3

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i, torch.rand(()).item()  # an "augmentation" drawn from the global generator


def test_per_sample_seed_gives_the_same_augmentation_in_any_order_and_worker():
    data = PerSampleSeed(_Noisy(), seed=7)
    data.set_epoch(1)
    forward = dict(data[i] for i in range(12))
    backward = dict(data[i] for i in reversed(range(12)))
    assert forward == backward
    loader = DataLoader(data, batch_size=3, num_workers=2, sampler=list(range(5, 12)))
    from_workers = {int(i): float(v) for batch in loader for i, v in zip(*batch)}
    assert all(from_workers[i] == pytest.approx(forward[i]) for i in range(5, 12))
    data.set_epoch(2)
    assert data[0][1] != forward[0]
    assert data.num_classes == 3  # attributes pass through


def test_per_sample_seed_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PerSampleSeed(_Noisy())[4]
    assert torch.equal(torch.rand(3), expected)


def test_mix_seed_spreads():
    seeds = {mix_seed(0, e, i) for e in range(5) for i in range(200)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


def test_sampler_pads_a_dataset_smaller_than_half_the_processes():
    """Padding wraps as often as needed: every rank gets the same count (DDP would hang otherwise)."""
    from acamkd.engine.sampling import ResumableSampler

    for length, world in ((1, 4), (2, 7), (3, 3), (5, 2)):
        per_rank = [ResumableSampler(length, shuffle=False, rank=r, world_size=world).indices() for r in range(world)]
        assert {len(ix) for ix in per_rank} == {-(-length // world)}, (length, world, per_rank)
        assert sorted({i for ix in per_rank for i in ix}) == list(range(length))
