"""Every `register_*` of hf_prune: the call form, the decorator form, `overwrite=`, and the errors, on all four tables
(weight methods, head/neuron, hidden-channel and layer criteria)."""

from __future__ import annotations

import pytest

import hf_prune
from hf_prune.methods import get_method, unregister_method
from hf_prune.units import unregister_channel_criterion, unregister_layer_criterion, unregister_unit_criterion

# (register, unregister, available, base class) of each table, by the name a user imports it under.
TABLES = {
    "method": (hf_prune.register_method, unregister_method, hf_prune.available_methods, hf_prune.PruningMethod),
    "unit": (hf_prune.register_unit_criterion, unregister_unit_criterion, hf_prune.available_unit_criteria,
             hf_prune.UnitCriterion),
    "channel": (hf_prune.register_channel_criterion, unregister_channel_criterion,
                hf_prune.available_channel_criteria, hf_prune.ChannelCriterion),
    "layer": (hf_prune.register_layer_criterion, unregister_layer_criterion, hf_prune.available_layer_criteria,
              hf_prune.LayerCriterion),
}


@pytest.fixture(params=list(TABLES))
def table(request):
    register, unregister, available, base = TABLES[request.param]
    yield register, available, base
    for name in ("mine", "other"):
        unregister(name)


def test_decorator_form_registers_and_returns_the_class(table):
    register, available, base = table

    @register("mine")
    class Mine(base):
        pass

    assert isinstance(Mine, type) and Mine.name == "mine" and available()[-1] == "mine"
    assert register("mine", Mine) is Mine  # the same class again (a module imported twice) is fine


def test_call_form_and_overwrite(table):
    register, available, base = table
    first = register("mine", type("First", (base,), {}))
    second = type("Second", (base,), {})
    with pytest.raises(ValueError, match=r"'mine' is already registered \(First\); pass overwrite=True"):
        register("mine", second)
    with pytest.raises(ValueError, match=r"'mine' is already registered \(First\)"):
        register("mine")(second)  # the decorator form checks the same
    assert register("mine", second, overwrite=True) is second
    assert register("other", overwrite=True)(first) is first
    assert available()[-2:] == ("mine", "other")


def test_bad_registrations_raise(table):
    register, _, base = table
    with pytest.raises(TypeError, match=rf"takes a subclass of hf_prune\.{base.__name__}, got <class 'object'>"):
        register("mine", object)
    with pytest.raises(TypeError, match=rf"subclass of hf_prune\.{base.__name__}"):
        register("mine")(int)
    for name in ("", "  ", None):
        with pytest.raises(ValueError, match=r"name=.* is invalid: give a non-empty string"):
            register(name)


def test_a_config_resolves_its_method_in_one_place():
    @hf_prune.register_method("mine")
    class Mine(hf_prune.PruningMethod):
        pass

    try:
        config = hf_prune.PruningConfig(method="mine")
        assert config.method_class() is Mine is get_method("mine")
        config.method = "gone"  # changed after construction: the error names the option, the value and the choices
        with pytest.raises(ValueError, match=r"PruningConfig.method='gone' is invalid: .*registered methods "
                                             r"\[.*'magnitude'.*'mine'\]"):
            config.method_class()
    finally:
        unregister_method("mine")
