"""ddfast.settings: scoped knobs that still read as plain values."""

import pytest
import torch

from ddfast import settings
from ddfast.errors import NotPSDError
from ddfast.reference.ridge_solve import ridge_weights_ref


def test_scopes_nest_restore_and_read_as_values():
    assert settings.max_jitter_tries.value() == 4 and settings.check_finite.value() is True
    with settings.max_jitter_tries(6):
        assert settings.max_jitter_tries == 6 and len(range(settings.max_jitter_tries)) == 6
        assert settings.max_jitter_tries - 1 == 5 and f"{settings.max_jitter_tries}" == "6"
        with settings.max_jitter_tries(1), settings.check_finite(False):
            assert int(settings.max_jitter_tries) == 1 and not settings.check_finite
        assert settings.max_jitter_tries.value() == 6 and settings.check_finite
    assert settings.max_jitter_tries.value() == 4
    with pytest.raises(RuntimeError):
        with settings.jitter_float32(1e-3):
            assert settings.jitter_for(torch.float32) == 1e-3
            raise RuntimeError
    assert settings.jitter_for(torch.float32) == 1e-6 and isinstance(settings.jitter_for(torch.float64), float)


def test_bad_values_name_the_knob():
    for knob, bad in ((settings.max_jitter_tries, -1), (settings.max_jitter_tries, 2.5),
                      (settings.check_finite, 1), (settings.jitter_float64, 0.0), (settings.jitter_float32, float("nan"))):
        with pytest.raises(ValueError, match=knob.name):
            knob(bad)
    settings.max_jitter_tries.set(5)
    try:
        assert settings.max_jitter_tries == 5
    finally:
        settings.max_jitter_tries.set(4)


def test_the_solve_reads_the_scoped_value():
    z = torch.ones(4, 3, dtype=torch.float32)  # rank one: needs jitter at a tiny λ
    y = torch.randn(4, 2)
    ridge_weights_ref(z, y, 1e-12)  # default policy: jitter rescues it
    with settings.max_jitter_tries(0), pytest.raises(NotPSDError):
        ridge_weights_ref(z, y, 1e-12)
