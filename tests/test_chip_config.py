"""The chip config group (conf/chip, noisebench/schema/chip.py): every profile composes into a valid GemmArith,
chip=none is null, bad values are refused naming the key, and the schema's choices are the engine's."""
import dataclasses

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

PROFILES = sorted(p.stem for p in (REPO / "conf" / "chip").glob("*.yaml") if p.stem != "none")


def test_required_profiles_ship():
    assert {"gpu_bf16", "fp8_fast_accum", "fp8_promote128", "mxfp8", "mxfp4"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_composes_into_the_engine(name):
    from noisebench.noise.chip import ChipProfile

    cfg = compose([f"chip={name}"])
    prof = ChipProfile.from_dict(OmegaConf.to_container(cfg.chip, resolve=True))
    assert prof.name == name and prof.provenance
    first = (REPO / "conf" / "chip" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 40             # the one-line provenance heads the file


def test_default_is_no_chip():
    assert compose().chip is None and compose(["chip=none"]).chip is None


def test_bad_values_are_refused_naming_key_and_choices():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["chip=fp8_fast_accum", "chip.acc_rounding=up"])
    assert "acc_rounding" in str(err.value.__cause__) and "toward_zero" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose(["chip=mxfp4", "chip.in_format=fp5"])
    assert "in_format" in str(err.value.__cause__) and "fp4_e2m1" in str(err.value.__cause__)


def test_range_is_checked_after_composition():
    from noisebench.schema import ConfigError, check

    with pytest.raises(ConfigError, match="chip.acc_mantissa_bits"):
        check(compose(["chip=fp8_fast_accum", "chip.acc_mantissa_bits=60"]))


def test_schema_choices_are_the_engine_choices():
    from noisebench.noise import accumulate, formats
    from noisebench.noise.chip import CHIP_OPS
    from noisebench.schema import chip

    assert [m.value for m in chip.ChipFormat] == list(formats.FORMATS)
    assert [m.value for m in chip.Scaling] == list(formats.SCALINGS)
    assert [m.value for m in chip.AccRounding] == list(accumulate.ACC_ROUNDINGS)
    assert [m.value for m in chip.AccAlignment] == list(accumulate.ACC_ALIGNMENTS)
    assert [m.value for m in chip.Overflow] == list(formats.OVERFLOWS)
    assert [m.value for m in chip.ChipOp] == list(CHIP_OPS)
    arith_keys = {f.name for f in dataclasses.fields(accumulate.GemmArith)} - {"b_format"}   # per GEMM, not a key
    assert arith_keys <= {f.name for f in dataclasses.fields(chip.ChipConfig)}


def test_a_chip_run_is_its_own_arm_and_resumes_only_under_its_chip():
    """A chip profile is a treatment: its record is named after it (never the baseline row) and the resume
    fingerprint includes it, while runs without a chip keep the fingerprint they had."""
    from omegaconf import OmegaConf

    from conftest import compose
    from noisebench.record import run_fingerprint, setting_fingerprint
    from noisebench.train.run_record import arm_name

    plain, chip = compose([]), compose(["chip=fp8_fast_accum"])
    assert arm_name(plain) == "baseline" and arm_name(chip) == "baseline+fp8_fast_accum"
    p, c = (OmegaConf.to_container(x, resolve=True) for x in (plain, chip))
    assert run_fingerprint(p) != run_fingerprint(c)
    assert setting_fingerprint(p) == setting_fingerprint(c)  # the same setting: compared with the same baseline
    del p["chip"]
    assert run_fingerprint(p) == run_fingerprint(OmegaConf.to_container(plain, resolve=True))


def test_resume_finds_a_chip_run_by_its_own_fingerprint():
    """resume=true looks a run up by the fingerprint of its composed config: it must be the one the run wrote
    (chip and device included), or a chip run is never preferred over a chip-less twin's folder."""
    from noisebench.record import run_fingerprint
    from noisebench.train.rundirs import _fingerprint_of
    wrote = {}
    for name, overrides in (("chip", ["chip=fp8_fast_accum"]), ("plain", []), ("cuda", ["device=cuda"])):
        cfg = compose(overrides)
        wrote[name] = run_fingerprint({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                                       if k != "hydra"})
        assert _fingerprint_of(cfg) == wrote[name], name
    assert len(set(wrote.values())) == 3


def test_the_plan_names_the_chip_and_warns_of_the_aligning_adder_on_the_cpu():
    """A laptop user learns before the run that the shipped FP8 profiles cut every product on the CPU, and a user of
    a GPU other than sm_90 that the exact FP8 adder runs as the definition there; exact chunk sums, an H100/H200 and
    no chip get no warning."""
    from noisebench.train.builders import slow_chip_note
    from noisebench.train.plan import plan_lines

    def chip_lines(overrides):
        return [line for line in plan_lines(compose(overrides)) if line.startswith(("chip", "    "))]

    lines = chip_lines(["chip=fp8_promote128", "device=cpu"])
    assert "fp8_promote128: fp8_e4m3 inputs (block scales), chunk 32, 13-bit toward_zero accumulator, promoted " \
           "every 128, max_exponent_unnormalized alignment; phases ['all']" in lines[0]
    assert "warning:" in lines[1] and "chip.acc_alignment=exact" in lines[1]
    assert len(chip_lines(["chip=fp8_promote128", "device=cpu", "chip.acc_alignment=exact"])) == 1
    assert slow_chip_note(compose(["chip=fp8_fast_accum"]), "cuda", capability=(9, 0)) is None
    assert "sm_90" in slow_chip_note(compose(["chip=fp8_fast_accum"]), "cuda", capability=(8, 9))
    assert slow_chip_note(compose(["chip=fp8_fast_accum", "chip.acc_alignment=max_exponent"]), "cuda",
                          capability=(8, 0)) is None
    assert slow_chip_note(compose(["chip=fp8_fast_accum"]), "cpu") is not None
    assert slow_chip_note(compose([]), "cpu") is None
    assert chip_lines([]) == ["chip            none (torch's arithmetic)"]
