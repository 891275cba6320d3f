import struct

import numpy as np
import pytest
import torch

from fedllm.compression import (HEADER, Feedback, compress, decode, encode, parse, quantize, register_codec,
                                topk)
from fedllm.compression.codecs import nearest
from fedllm.compression.wire import pack, pack_bits, unpack, unpack_bits, varint_decode, varint_encode
from fedllm.errors import ConfigError, PayloadError


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.lora_A.weight": torch.randn(8, 96, generator=g),
        "layer.0.lora_B.weight": torch.randn(64, 8, generator=g) * 0.01,
        "layer.1.bias": torch.randn(33, generator=g),
    }


def _flat(tensors):
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


def _exact(x, y, spec):
    return torch.equal(x, y)


def _topk_bound(x, y, spec):
    kept = y != 0
    return torch.equal(y[kept], x[kept]) and bool((x[~kept].abs() <= x[kept].abs().min() + 1e-7).all())


def _randk_bound(p, unbiased=True):
    def check(x, y, spec):
        kept = y != 0
        share = kept.float().mean().item()
        return torch.allclose(y[kept], x[kept] / (p if unbiased else 1.0)) and abs(share - p) < 0.05
    return check


def _topk_tensor_bound(x, y, spec):
    sizes = [t.numel() for _, t in sorted(_tensors().items())]
    return all(_topk_bound(a, b, spec) for a, b in zip(x.split(sizes), y.split(sizes)))


def _quant_bound(bits, block, stochastic):
    def check(x, y, spec):
        qmax = 2 ** (bits - 1) - 1
        pad = (-len(x)) % block
        s = torch.cat([x, torch.zeros(pad)]).reshape(-1, block).abs().amax(1) / qmax
        s = s.repeat_interleave(block)[: len(x)]
        err = (x - y).abs()
        return bool((err < s + 1e-7).all()) if stochastic else bool((err <= s / 2 + 1e-6).all())
    return check


def _cluster_bound(k):
    def check(x, y, spec):
        book = torch.unique(y)
        assert len(book) <= k
        # every value decodes to its nearest codebook entry
        near = book[(x[:, None] - book[None]).abs().argmin(1)]
        if not torch.allclose((x - near).abs(), (x - y).abs(), atol=1e-6):
            return False
        grid = torch.linspace(x.min().item(), x.max().item(), k)
        grid_err = ((x - grid[(x[:, None] - grid[None]).abs().argmin(1)]) ** 2).mean()
        return bool(((x - y) ** 2).mean() <= grid_err + 1e-9)
    return check


# The shared table: every codec joins with a row (spec, bound check on the flat values).
CODECS = {
    "none": _exact,
    "zstd": _exact,
    "zstd(19)": _exact,
    "topk(0.05)": _topk_bound,
    "topk(0.1, scope='tensor')": _topk_tensor_bound,
    "randk(0.25)": _randk_bound(0.25),
    "randk(0.5, unbiased=False) > zstd": _randk_bound(0.5, unbiased=False),
    "quantize(8)": _quant_bound(8, 64, True),
    "quantize(4, block=16)": _quant_bound(4, 16, True),
    "quantize(2, block=32)": _quant_bound(2, 32, True),
    "quantize(4, stochastic=False)": _quant_bound(4, 64, False),
    "cluster(16)": _cluster_bound(16),
    "cluster(4) > zstd": _cluster_bound(4),
    "int8": _quant_bound(8, 64, True),
}


@pytest.mark.parametrize("spec", list(CODECS))
def test_codec_round_trip_within_bound(spec):
    codec, t = parse(spec), _tensors()
    payload = encode(codec, t, seed=3)
    out = decode(codec, payload, sorted(t))
    assert sorted(out) == sorted(t)
    assert all(out[k].shape == t[k].shape and out[k].dtype == torch.float32 for k in t)
    assert CODECS[spec](_flat(t), _flat(out), spec)


@pytest.mark.parametrize("spec", list(CODECS))
def test_codec_is_deterministic_given_the_seed(spec):
    codec, t = parse(spec), _tensors()
    assert encode(codec, t, seed=5) == encode(codec, t, seed=5)


def test_chain_bound_topk_then_quantize():
    codec, t = parse("topk(0.05) > quantize(4, block=8) > zstd"), _tensors()
    x, y = _flat(t), _flat(decode(codec, encode(codec, t, 0), sorted(t)))
    kept = y != 0
    assert kept.sum() <= round(0.05 * len(x))
    big = x.abs().topk(int(round(0.05 * len(x)))).values.min()
    assert (x[kept].abs() >= big - 1e-6).all()  # only top-k positions can be non-zero
    scale = x.abs().max() / 7
    assert ((x - y).abs()[kept] < scale).all()


def test_stochastic_rounding_is_unbiased():
    codec = parse("quantize(2, block=4)")
    t = {"x": torch.tensor([0.3, -0.1, 1.0, 0.55])}
    mean = torch.stack([decode(codec, encode(codec, t, seed), ["x"])["x"] for seed in range(4000)]).mean(0)
    assert torch.allclose(mean, t["x"], atol=0.03)
    nearest_q = decode(parse("quantize(2, block=4, stochastic=False)"), encode(parse("quantize(2, block=4, stochastic=False)"), t, 0), ["x"])
    assert torch.equal(nearest_q["x"], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # biased by hand


def test_random_sparsification_is_unbiased_and_sends_no_positions():
    codec = parse("randk(0.25)")
    t = {"x": torch.tensor([1.0, -2.0, 0.5, 0.0])}
    mean = torch.stack([decode(codec, encode(codec, t, seed), ["x"])["x"] for seed in range(4000)]).mean(0)
    assert torch.allclose(mean, t["x"], atol=0.12)
    frame = unpack(encode(codec, {"x": torch.randn(10_000)}, 0)[HEADER:])
    assert set(frame) == {"shape", "rs", "v"} and frame["rs"].nbytes == 8  # a seed, not positions


def test_quantize_payload_sizes_follow_the_formula():
    t = {"x": torch.randn(1000)}
    for bits in (8, 4, 2):
        frame = unpack(encode(quantize(bits, block=64), t, 0)[HEADER:])
        assert len(frame["q"]) == -(-1000 * bits // 8)       # codes: bits per value
        assert frame["qs"].nbytes == 4 * -(-1000 // 64)     # one float32 scale per block


def test_sparse_positions_are_compact():
    t = {"x": torch.randn(200_000)}
    frame = unpack(encode(topk(0.01), t, 0)[HEADER:])
    assert len(frame["v"]) == 2000
    assert frame["i"].nbytes < 1.5 * 2000  # varint deltas: ~1 byte each, not 8 (int64)
    z = encode(parse("topk(0.01) > zstd"), t, 0)
    assert len(z) < 2000 * 4 + 2000 * 1.5


def test_payload_is_what_is_counted():
    codec, t = parse("topk-int4"), _tensors()
    payload, _ = compress(codec, t, None, seed=0)
    assert payload == encode(codec, t, 0)
    assert isinstance(payload, bytes)


def test_error_feedback_cumulative_sum_converges():
    codec = parse("topk(0.1) > quantize(4)")
    g = torch.Generator().manual_seed(1)
    fb = Feedback({})
    true_sum = torch.zeros(500)
    ef_sum, plain_sum = torch.zeros(500), torch.zeros(500)
    errors = []
    for r in range(300):
        x = {"w": torch.randn(500, generator=g) * 0.1 + 0.05}
        true_sum += x["w"]
        payload, fb = compress(codec, x, fb, seed=r)
        ef_sum += decode(codec, payload, ["w"])["w"]
        plain_sum += decode(codec, encode(codec, x, r), ["w"])["w"]
        # decoded sum = true sum - residual, exactly (up to float rounding)
        assert torch.allclose(ef_sum, true_sum - fb.residual["w"], atol=1e-3)
        errors.append((ef_sum - true_sum).norm() / true_sum.norm())
    assert errors[-1] < 0.03 and errors[-1] < errors[20] / 5  # measured 0.014 and 0.18
    assert (plain_sum - true_sum).norm() / true_sum.norm() > 5 * errors[-1]


def test_varint_and_bits_round_trip():
    x = np.array([0, 1, 127, 128, 300, 2**31, 2**62], dtype=np.uint64)
    enc = varint_encode(x)
    assert len(enc) == 1 + 1 + 1 + 2 + 2 + 5 + 9
    assert np.array_equal(varint_decode(enc), x)
    for bits in (1, 2, 4, 8):
        codes = np.random.default_rng(0).integers(0, 2**bits, 37).astype(np.uint8)
        assert np.array_equal(unpack_bits(pack_bits(codes, bits), bits, 37), codes)
    assert np.array_equal(nearest(np.array([-1.0, 0.4, 0.6, 9.0]), np.array([0.0, 1.0])), [0, 0, 1, 1])


def _mutate(payload: bytes, pos: int, value: int) -> bytes:
    b = bytearray(payload)
    b[pos] = value
    return bytes(b)


def _field_offset(payload: bytes, name: str) -> int:
    return payload.index(bytes([len(name)]) + name.encode(), HEADER)


def _bad_payloads():
    t = _tensors()
    q = encode(parse("topk(0.05) > quantize(4)"), t, 0)
    z = encode(parse("topk-int4"), t, 0)
    frame = unpack(q[HEADER:])
    n = int(varint_decode(frame["qn"])[0])
    out_of_range = dict(frame, i=varint_encode(np.array([10**7] + [1] * (n - 1))))
    nan_scale = dict(frame, qs=np.full_like(frame["qs"], np.nan))
    few_scales = dict(frame, qs=frame["qs"][:-1])
    repeated = dict(frame, i=varint_encode(np.array([5, 0] + [1] * (n - 2))))
    short_codes = dict(frame, q=frame["q"][:-1])
    no_field = {k: v for k, v in frame.items() if k != "qs"}
    bad_shape = dict(frame, shape=varint_encode(np.array([2, 8, 96])))
    r = encode(parse("randk(0.3)"), t, 0)
    rframe = unpack(r[HEADER:])
    short_seed = dict(rframe, rs=rframe["rs"][:7])
    extra_value = dict(rframe, v=np.append(rframe["v"], np.float32(1.0)))
    return {
        "randk seed": ("randk(0.3)", r[:HEADER] + pack(short_seed)),
        "randk count": ("randk(0.3)", r[:HEADER] + pack(extra_value)),
        "empty": ("topk(0.05) > quantize(4)", b""),
        "bad magic": ("topk(0.05) > quantize(4)", b"XX" + q[2:]),
        "truncated": ("topk(0.05) > quantize(4)", q[: len(q) // 2]),
        "trailing bytes": ("topk(0.05) > quantize(4)", q + b"\x00"),
        "other codec": ("topk(0.05) > quantize(8)", q),
        "other names": ("topk(0.05) > quantize(4)", q[:7] + struct.pack("<I", 1) + q[HEADER:]),
        "index out of range": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(out_of_range)),
        "repeated index": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(repeated)),
        "nan scales": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(nan_scale)),
        "scale count": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(few_scales)),
        "code count": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(short_codes)),
        "missing field": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(no_field)),
        "wrong shapes": ("topk(0.05) > quantize(4)", q[:HEADER] + pack(bad_shape)),
        "bad dtype code": ("topk(0.05) > quantize(4)", _mutate(q, _field_offset(q, "shape") + 6, 9)),
        "zstd garbage": ("topk-int4", z[:HEADER + 5] + bytes(range(40))),
        "zstd truncated": ("topk-int4", z[:-7]),
        "nan values": ("none", encode(parse("none"), {**t, "layer.1.bias": torch.full((33,), float("nan"))}, 0)),
    }


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_malformed_payload_is_rejected(case):
    spec, payload = _bad_payloads()[case]
    with pytest.raises(PayloadError):
        decode(parse(spec), payload, sorted(_tensors()))


def test_error_feedback_refuses_rescaled_random_sparsification():
    from fedllm.config import Config

    with pytest.raises(ConfigError, match="compression.up: randk.*error feedback amplifies"):
        Config.from_flat({"compression.up": "randk(0.1) > zstd"})
    Config.from_flat({"compression.up": "randk(0.1) > zstd", "compression.error-feedback": False})
    Config.from_flat({"compression.up": "randk(0.1, unbiased=False) > zstd"})


def test_parse_errors_name_the_stage():
    with pytest.raises(ConfigError, match="unknown codec"):
        parse("topk(0.1) > gzip")
    with pytest.raises(ConfigError, match="quantize: bits"):
        parse("quantize(3)")
    with pytest.raises(ConfigError, match="topk"):
        parse("topk(fraction=2)")
    with pytest.raises(ConfigError, match="codec stage"):
        parse("topk(0.1")
    assert parse("topk(0.01) -> quantize(4) -> zstd").name == parse("topk-int4").name


def test_register_codec_checks_names():
    with pytest.raises(ValueError, match="lower-case"):
        register_codec("TopK", topk)
    with pytest.raises(ValueError, match="registered already"):
        register_codec("topk", quantize)
