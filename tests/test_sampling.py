import pytest
import torch

from lightning_memwatch.sampling import accepts_noise, draw_samples, per_sample_noise, rank_slice


def deterministic_sampler(num_samples, generator=None, noise=None):
    return torch.tanh(noise * 0.5)


def generator_sampler(num_samples, generator=None):
    return torch.rand((num_samples, 1, 4, 4), generator=generator) * 2 - 1


def draw(sampler, n, batch_size, indices=None):
    return draw_samples(
        sampler,
        indices or range(n),
        batch_size=batch_size,
        seed=3,
        device=torch.device("cpu"),
        noise_shape=(1, 4, 4),
        sample_shape=(1, 4, 4),
    )


def test_per_sample_noise_independent_of_batching_and_ranks():
    # bit-exact across batch sizes by construction: the noise rows are drawn one by one and the sampler is
    # elementwise (no reduction or GEMM whose blocking depends on the batch)
    full = draw(deterministic_sampler, 10, batch_size=10)
    assert torch.equal(full, draw(deterministic_sampler, 10, batch_size=1))
    assert torch.equal(full, draw(deterministic_sampler, 10, batch_size=3))
    parts = [draw(deterministic_sampler, 10, 4, indices=rank_slice(10, r, 3)) for r in range(3)]
    assert torch.equal(full, torch.cat(parts))
    assert not torch.equal(full[0], full[1])


def test_generator_form_reproducible_for_fixed_batching():
    a = draw(generator_sampler, 8, batch_size=4)
    b = draw(generator_sampler, 8, batch_size=4)
    assert torch.equal(a, b)  # bit-exact: one batch size on both sides, so the same generators and draws
    assert not torch.equal(a[:4], a[4:])


def test_rank_slices_cover_everything_once():
    for n, world in [(10, 3), (2, 4), (1000, 8)]:
        covered = [i for r in range(world) for i in rank_slice(n, r, world)]
        assert covered == list(range(n))


def test_noise_depends_on_seed_and_index_only():
    a = per_sample_noise(range(5, 7), (3,), seed=1)
    b = per_sample_noise(range(0, 7), (3,), seed=1)[5:]
    c = per_sample_noise(range(5, 7), (3,), seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_accepts_noise():
    assert accepts_noise(deterministic_sampler) and not accepts_noise(generator_sampler)


@pytest.mark.parametrize(
    "sampler, error, message",
    [
        (
            lambda n, generator=None: torch.zeros(n - 1, 1, 4, 4),
            ValueError,
            "asked for 2 samples and returned 1",
        ),
        (lambda n, generator=None: torch.zeros(n, 1, 4, 5), ValueError, "training images have shape"),
        (lambda n, generator=None: torch.zeros(n, 1, 4, 4, dtype=torch.int64), TypeError, "not integers"),
        (lambda n, generator=None: torch.full((n, 1, 4, 4), float("nan")), ValueError, "NaN/Inf"),
        (lambda n, generator=None: [0.0] * n, TypeError, "must return a torch.Tensor"),
    ],
)
def test_bad_sampler_outputs(sampler, error, message):
    with pytest.raises(error, match=message):
        draw(sampler, 2, batch_size=2)


def test_sampler_taking_noise_but_no_generator_is_called_without_it():
    def noise_only(num_samples, noise=None):  # was: TypeError "unexpected keyword argument 'generator'"
        return torch.tanh(noise * 0.5)

    # the same per-sample noise reaches it as deterministic_sampler (which also takes a generator)
    assert torch.equal(draw(noise_only, 4, batch_size=2), draw(deterministic_sampler, 4, batch_size=2))


def test_sampler_taking_kwargs_gets_the_generator():
    seen = []

    def forwarding(num_samples, **kwargs):
        seen.append(sorted(kwargs))
        return torch.zeros(num_samples, 1, 4, 4)

    draw(forwarding, 2, batch_size=2)
    assert seen == [["generator"]]  # **kwargs is not taken as accepting noise: only the named keyword is


def test_sampler_taking_neither_generator_nor_noise_names_the_contract():
    def unseeded(num_samples):
        return torch.rand(num_samples, 1, 4, 4)

    with pytest.raises(TypeError, match=r"takes neither `generator` nor `noise`.*sample\(num_samples, generator=None"):
        draw(unseeded, 2, batch_size=2)


def test_gather_in_order_pads_the_shares_and_cuts_them_back():
    """Shares of 3, 2 and 2 of 7 samples: each is padded to 3 for all_gather and the result is the 7 in order."""
    from lightning_memwatch.sampling import gather_in_order

    total, world = 7, 3
    samples = torch.arange(total * 2, dtype=torch.float32).view(total, 2)
    shares = [samples[rank_slice(total, r, world).start : rank_slice(total, r, world).stop] for r in range(world)]
    sent = []  # what each rank hands to all_gather
    for share in shares:
        gather_in_order(share, total, world, lambda x: sent.append(x) or torch.zeros(world, *x.shape))
    assert [tuple(x.shape) for x in sent] == [(3, 2)] * 3
    for share in shares:  # every rank gets every sample, in index order
        assert torch.equal(gather_in_order(share, total, world, lambda x: torch.stack(sent)), samples)
    assert gather_in_order(samples, total, 1, None) is samples  # one process: nothing to gather
