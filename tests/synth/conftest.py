"""Shared GAN checks live outside test modules; pytest rewrites their asserts too, so a failure
shows the values compared."""

import pytest

pytest.register_assert_rewrite("tests.synth.gan_checks")
