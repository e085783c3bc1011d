"""``additional_config["dspark"]`` validation: every setting has a rule, and the messages name field and value."""
from __future__ import annotations

import re
from dataclasses import fields

import pytest

from vllm_dspark.config import DSparkConfigError
from vllm_dspark.settings import RULES, DSparkSettings


def _error(**dspark) -> str:
    with pytest.raises(DSparkConfigError) as info:
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", **dspark}})
    return str(info.value)


def test_every_setting_has_a_rule():
    # A new field without a rule would go unvalidated.
    assert set(RULES) == {f.name for f in fields(DSparkSettings)}


def test_the_defaults_pass_their_rules():
    settings = DSparkSettings.from_additional_config({"dspark": {"drafter": "d"}})
    assert all(rule.error(getattr(settings, name)) is None for name, rule in RULES.items() if name != "drafter")


def test_bad_prefix_cache_mb_and_topk():
    assert _error(prefix_cache_mb=0) == 'additional_config["dspark"]["prefix_cache_mb"]=0: expected an integer >= 1'
    assert _error(prefix_cache_mb="64") == ('additional_config["dspark"]["prefix_cache_mb"]=\'64\': '
                                            'expected an integer >= 1')
    assert _error(topk=True) == 'additional_config["dspark"]["topk"]=True: expected an integer >= 0'
    assert re.fullmatch(r'.*\["topk"\]=-1: expected an integer >= 0', _error(topk=-1))
