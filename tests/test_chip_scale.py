"""A chip profile's GEMM error in the noise rows' units (noisebench/noise/chip_scale.py), against what the formats
predict: rounding errors of independent inputs and of the output add in quadrature."""
import math
from pathlib import Path

import pytest
import yaml

from noisebench.noise.accumulate import GemmArith
from noisebench.noise.chip_scale import chip_rel_rms, gemm_rel_rms

BF16 = 1.66e-3  # the board's unit (noisebench.leaderboard.table.BF16_RMS): RMS relative error of bf16 rounding
FP8 = 2.7e-2  # e4m3 rounding's, same definition
PROFILES = {p.stem: yaml.safe_load(p.read_text()) for p in (Path(__file__).parents[1] / "conf" / "chip").glob("*.yaml")
            if p.stem != "none"}


def test_board_unit_is_the_leaderboards():
    from noisebench.leaderboard.table import BF16_RMS

    assert BF16_RMS == BF16


def test_output_rounding_alone_is_one_bf16_unit():
    """fp32 inputs, fp32 accumulation, bf16 output: only the output's rounding, 1x bf16 by construction, within 5%
    (measured 0.996)."""
    x = gemm_rel_rms(GemmArith(in_format="fp32", out_format="bf16")) / BF16
    assert x == pytest.approx(1.0, rel=0.05)


def test_gpu_bf16_is_sqrt3_bf16_units():
    """bf16 inputs (two roundings per product) and a bf16 output: sqrt(3) = 1.73x bf16, within 10% (measured 1.73)."""
    x = chip_rel_rms(PROFILES["gpu_bf16"]) / BF16
    assert x == pytest.approx(math.sqrt(3), rel=0.1)


def test_fp8_and_mx_profiles_scale_with_their_formats():
    """e4m3 inputs: about sqrt(2) x fp8 rounding (23x bf16, measured 22.5 at K=128); mxfp4 (e2m1) far above (97x);
    the DeepSeek fix (promotion every 128) no worse than fast accumulation at K=1536."""
    x = {name: chip_rel_rms(d) / BF16 for name, d in PROFILES.items()}
    assert x["fp8_fast_accum"] == pytest.approx(math.sqrt(2) * FP8 / BF16, rel=0.15)
    assert x["mxfp4"] > 3 * x["fp8_fast_accum"] and x["mxfp4"] > 3 * x["mxfp8"]
    assert chip_rel_rms(PROFILES["fp8_promote128"], 1536) <= chip_rel_rms(PROFILES["fp8_fast_accum"], 1536)


def test_accumulator_width_shows_at_large_k():
    """A 10-bit truncating accumulator with no promotion at K=4096: 110x bf16 (measured); fp32 accumulation 2e-7."""
    narrow = gemm_rel_rms(GemmArith(in_format="fp32", acc_mantissa_bits=10, acc_rounding="toward_zero",
                                    chunk=4), 4096)
    wide = gemm_rel_rms(GemmArith(in_format="fp32"), 4096)
    assert wide < 1e-6 and narrow > 50 * BF16


def test_cached_and_fixed():
    arith = GemmArith(in_format="bf16")
    gemm_rel_rms.cache_clear()
    a = gemm_rel_rms(arith)
    assert gemm_rel_rms(arith) == a and gemm_rel_rms.cache_info().hits == 1


def test_profile_without_gemms_is_zero():
    assert chip_rel_rms({**PROFILES["gpu_bf16"], "ops": ["softmax"]}) == 0.0
