"""Options are validated with errors that name the valid choices."""
import pytest
import torch

import fusion_backend
from fusion_backend import OptionError, parse_options


def test_defaults():
    opts = parse_options(None)
    assert opts.strategy == "moderate" and opts.inner == "inductor" and opts.simulations == 30


def test_bad_strategy_names_the_valid_ones():
    with pytest.raises(OptionError) as err:
        fusion_backend.backend(strategy="reckless")
    for name in ("conservative", "moderate", "aggressive"):
        assert name in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(OptionError) as err:
        parse_options({"strategey": "aggressive"})
    assert "strategey" in str(err.value) and "strategy" in str(err.value)


@pytest.mark.parametrize("options, fragment", [
    ({"inner": "tvm"}, "'inductor'"),
    ({"simulations": 0}, ">= 1"),
    ({"tuning_seconds": -1}, "positive"),
    ({"tuning_seconds": float("nan")}, "positive"),
    ({"tuning_seconds": -float("inf")}, "positive"),
    ({"tuning_seconds": True}, "positive"),
    ({"simulations": True}, ">= 1"),
    ({"simulations": float("nan")}, ">= 1"),
    ({"simulations": 2.5}, ">= 1"),
    ({"seed": True}, "integer"),
    ({"seed": float("nan")}, "integer"),
    ({"monitor": "yes"}, "True or False"),
    ({"mode": "fastest"}, "'max-autotune'"),
    ({"mode": ""}, "'default'"),
])
def test_bad_values(options, fragment):
    with pytest.raises(OptionError) as err:
        parse_options(options)
    assert fragment in str(err.value)


def test_infinite_tuning_seconds_means_no_cap():
    assert parse_options({"tuning_seconds": float("inf")}).tuning_seconds is None
    assert parse_options({"tuning_seconds": 2}).tuning_seconds == 2.0


def test_mode_none_is_the_default_as_in_torch_compile():
    assert parse_options({"mode": None}).mode == "default"


def test_inductor_option_typo_names_the_close_match():
    with pytest.raises(OptionError) as err:
        parse_options({"inductor_options": {"max_autotuen": True}})
    assert "'max_autotuen'" in str(err.value) and "'max_autotune'" in str(err.value)
    with pytest.raises(OptionError):
        parse_options({"inductor_options": {"triton.cudagraph": True}})
    assert parse_options({"inductor_options": {"triton.cudagraphs": False}}).inductor_options == {
        "triton.cudagraphs": False}


@pytest.mark.parametrize("disable", [["Attention"], ["attention_dot"], "attention.nope"])
def test_disabling_an_unknown_rule_names_the_rules_and_kinds(disable):
    with pytest.raises(OptionError) as err:
        parse_options({"disable": disable})
    message = str(err.value)
    assert "neither a rule name nor a kind" in message
    assert "Kinds: attention, feedforward" in message and "attention.dot," in message


@pytest.mark.parametrize("disable", [None, 5, [3]])
def test_disable_of_the_wrong_type_is_an_option_error(disable):
    with pytest.raises(OptionError, match="list of rule names or kinds"):
        parse_options({"disable": disable})


def test_disable_takes_rule_names_and_kinds():
    assert parse_options({"disable": ["feedforward", "attention.dot"]}).disable == ("feedforward", "attention.dot")
    assert parse_options({"disable": "attention"}).disable == ("attention",)


def test_mode_raises_the_budget():
    assert parse_options({}, mode="max-autotune").budget > parse_options({}).budget


def test_bad_option_through_torch_compile_is_reported():
    m = torch.nn.Linear(4, 4)
    compiled = torch.compile(m, backend="truthfuse", options={"strategy": "wild"})
    with pytest.raises(Exception) as err:
        compiled(torch.randn(2, 4))
    assert "conservative" in str(err.value) and "aggressive" in str(err.value)


def test_torch_compile_mode_reaches_the_backend():
    seen = []
    from fusion_backend.backend import TruthfuseBackend as backend_class

    original = backend_class.__call__

    def spy(self, gm, example_inputs):
        seen.append(self.options)
        return original(self, gm, example_inputs)

    backend_class.__call__ = spy
    try:
        def fn(x):
            return torch.sin(x) * 2

        x = torch.randn(2, 4)
        # torch.compile takes mode or options, not both: the inner compiler is Inductor here
        out = torch.compile(fn, backend="truthfuse", mode="max-autotune")(x)
        torch.testing.assert_close(out, fn(x))
    finally:
        backend_class.__call__ = original
    assert seen and seen[0].mode == "max-autotune" and seen[0].search_configs
    assert seen[0].budget == 4 * seen[0].simulations



@pytest.mark.parametrize("options, fragment", [
    ("aggressive", "did you mean {'strategy': 'aggressive'}?"),
    (["strategy", "aggressive"], "must be a dict of option names to values"),
])
def test_options_that_are_not_a_dict_say_so(options, fragment):
    """options="aggressive" failed in dict() with 'dictionary update sequence element #0 has
    length 1; 2 is required' (found by a sixteenth fuzz round)."""
    with pytest.raises(OptionError) as err:
        parse_options(options)
    assert fragment in str(err.value)


def test_options_parsed_already_are_taken_as_they_are():
    parsed = parse_options({"strategy": "aggressive", "disable": ["feedforward"], "tuning_seconds": 3})
    assert parse_options(parsed) == parsed


def test_the_backend_factory_passed_uncalled_says_to_call_it():
    """torch.compile(m, backend=fusion_backend.backend) failed at the first call with 'backend()
    takes 0 positional arguments but 2 were given' (found by a sixteenth fuzz round)."""
    compiled = torch.compile(torch.nn.Linear(4, 4), backend=fusion_backend.backend)
    with pytest.raises(Exception) as err:
        compiled(torch.randn(2, 4))
    assert "fusion_backend.backend(strategy=" in str(err.value)


def test_a_backend_made_from_a_dict_of_options():
    """TruthfuseBackend({...}) failed at the first graph with "'dict' object has no attribute
    'inner'"; a bad dict is an OptionError when the backend is made (a sixteenth fuzz round)."""
    made = fusion_backend.TruthfuseBackend({"strategy": "aggressive", "inner": "eager", "cache": False})
    assert made.options == parse_options({"strategy": "aggressive", "inner": "eager", "cache": False})
    m, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    torch.testing.assert_close(torch.compile(m, backend=made)(x), m(x))
    with pytest.raises(OptionError, match="'aggressive'"):
        fusion_backend.TruthfuseBackend({"strategy": "aggresive"})


def test_numpy_numbers_are_numbers():
    """simulations=np.int64(5) (a config file's, or an array's) was refused as 'must be an integer
    >= 1' (found by a sixteenth fuzz round); the options hold plain Python numbers."""
    np = pytest.importorskip("numpy")
    opts = parse_options({"simulations": np.int64(5), "seed": np.int32(3), "tuning_seconds": np.float32(2.5)})
    assert (opts.simulations, opts.seed, opts.tuning_seconds) == (5, 3, 2.5)
    assert type(opts.simulations) is int and type(opts.seed) is int and type(opts.tuning_seconds) is float
    with pytest.raises(OptionError, match=">= 1"):
        parse_options({"simulations": np.bool_(True)})
