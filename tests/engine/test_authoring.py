"""The public rule-authoring API as a user meets it: a rule of their own, constraints that
report near-misses, priorities, symbolic shapes, and rules shipped by a third-party package."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusion_backend
from fusion_backend import Match, Rule, dims_equal, maybe, register_rule, unregister_rule

AGGRESSIVE_EAGER = {"strategy": "aggressive", "inner": "eager", "cache": False}
calls = {"n": 0}


def scaled_gelu_pattern(x, w, b, s):
    return F.gelu(maybe(torch.mul)(F.linear(x, w, b), s))


def scaled_gelu_replacement(x, w, b, s):
    calls["n"] += 1
    y = torch.addmm(b, x.reshape(-1, x.shape[-1]), w.t()).reshape(*x.shape[:-1], w.shape[0])
    return F.gelu(y if s is None else y * s)


def wide_enough(m: Match):
    return None if m.values["w"].shape[0] >= 8 else f"only {m.values['w'].shape[0]} output features"


@pytest.fixture
def user_rule():
    rule = Rule(name="user.linear_gelu", kind="custom", pattern=scaled_gelu_pattern,
                replacement=scaled_gelu_replacement, constraints=[wide_enough], priority=1000,
                variant="gelu")
    register_rule(rule)
    yield rule
    unregister_rule(rule.name)


class Tiny(torch.nn.Module):
    def __init__(self, out_features=16):
        super().__init__()
        self.lin = torch.nn.Linear(8, out_features)

    def forward(self, x):
        return F.gelu(self.lin(x) / 2)  # "/ 2" canonicalizes to "* 0.5": the optional step matches


def test_user_rule_matches_and_replaces(user_rule):
    model, x = Tiny(), torch.randn(3, 5, 8)
    report = fusion_backend.explain(model, x, options=AGGRESSIVE_EAGER)
    site = [s for s in report.sites if s.rule == "user.linear_gelu"][0]
    assert (site.kind, site.variant, site.decision) == ("custom", "gelu", "fused")
    before = calls["n"]
    compiled = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
    assert calls["n"] > before  # our replacement was traced into the graph


def test_failed_constraint_is_a_near_miss_with_its_reason(user_rule):
    report = fusion_backend.explain(Tiny(out_features=4), torch.randn(2, 8), options=AGGRESSIVE_EAGER)
    site = [s for s in report.sites if s.rule == "user.linear_gelu"][0]
    assert site.decision == "kept" and site.reason == "only 4 output features"


def test_duplicate_names_are_refused(user_rule):
    with pytest.raises(ValueError, match="already registered"):
        register_rule(Rule(name="user.linear_gelu", kind="custom", pattern=scaled_gelu_pattern,
                           replacement=scaled_gelu_replacement))


def test_replacement_must_accept_the_wildcards():
    with pytest.raises(ValueError, match="lacks parameters"):
        Rule(name="bad", kind="custom", pattern=lambda x, y: x + y, replacement=lambda x: x)


def test_symbolic_shape_constraint_holds_under_dynamic_shapes():
    def pattern(a, b):
        return torch.tanh(torch.add(a, b))

    def replacement(a, b):
        return torch.tanh(a + b)

    seen = []

    def record(m):
        seen.append(m.values["a"].shape[0])
        return dims_equal("a", 0, "b", 0)(m)

    rule = Rule(name="user.tanh_add", kind="custom", pattern=pattern, replacement=replacement,
                constraints=[record])
    register_rule(rule)
    try:
        def same(x):
            return torch.tanh(x + x * 2)

        def broadcast(x, y):
            return torch.tanh(x + y)

        report = fusion_backend.explain(same, torch.randn(6, 3), options=AGGRESSIVE_EAGER)
        assert [s.decision for s in report.sites if s.rule == rule.name] == ["fused"]
        compiled = torch.compile(broadcast, backend=fusion_backend.backend(**AGGRESSIVE_EAGER), dynamic=True)
        x, y = torch.randn(6, 3), torch.randn(1, 3)
        torch.testing.assert_close(compiled(x, y), broadcast(x, y))
        assert any(isinstance(s, torch.SymInt) for s in seen)
    finally:
        unregister_rule(rule.name)


def _installed_plugin(tmp_path, name, kind):
    """A package `my_rules` on tmp_path whose distribution declares one rule, `name` of `kind`, in
    truthfuse's entry-point group, as pip would install it."""
    (tmp_path / "my_rules.py").write_text(textwrap.dedent(f"""
        import torch
        from fusion_backend import Rule
        RULE = Rule(name={name!r}, kind={kind!r}, pattern=lambda x: torch.sigmoid(torch.sigmoid(x)),
                    replacement=lambda x: torch.sigmoid(torch.sigmoid(x)))
    """))
    dist = tmp_path / "my_rules-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{fusion_backend.ENTRY_POINT_GROUP}]\nsig = my_rules:RULE\n")


def test_third_party_rules_load_from_the_entry_point_group(tmp_path):
    _installed_plugin(tmp_path, "plugin.sigmoid_sigmoid", "custom")
    code = textwrap.dedent("""
        import fusion_backend
        names = [r.name for r in fusion_backend.all_rules()]
        assert "plugin.sigmoid_sigmoid" in names, names
        print("OK")
    """)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_a_built_in_rule_name_is_taken_before_the_built_ins_load():
    """In a fresh process nothing has loaded the built-in rules yet. A user rule registered then
    under a built-in's name was accepted, and the built-ins, loaded at the first compile, replaced
    it silently, even when it was registered with replace=True."""
    code = textwrap.dedent("""
        import torch
        import fusion_backend
        from fusion_backend import Rule, get_rule, register_rule
        mine = Rule(name="attention.dot", kind="custom", pattern=lambda x: torch.tanh(torch.tanh(x)),
                    replacement=lambda x: torch.tanh(torch.tanh(x)))
        try:
            register_rule(mine)
        except ValueError as exc:
            assert "already registered" in str(exc), exc
        else:
            raise AssertionError("a built-in rule's name was accepted")
        register_rule(mine, replace=True)
        fusion_backend.all_rules()
        assert get_rule("attention.dot") is mine
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_a_plugin_still_replaces_a_built_in_when_the_library_is_imported_first(tmp_path):
    """register_rule loads the built-ins and plugins first, except from within the built-in
    library's own import: a program importing truthfuse_patterns first would otherwise load the
    plugins in the middle of it, and the built-in registered after the plugin replaced it."""
    _installed_plugin(tmp_path, "attention.dot", "plugin")
    code = textwrap.dedent("""
        import truthfuse_patterns
        import fusion_backend
        fusion_backend.all_rules()
        assert fusion_backend.get_rule("attention.dot").kind == "plugin"
        print("OK")
    """)
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]

def test_guard_equal_accepts_separate_symbols_under_a_guard_and_refuses_when_unsure():
    """known_equal never guesses; guard_equal takes two backed symbols whose example values agree
    (adding a guard), refuses ones that differ, and says no, without raising, for data-dependent
    sizes that have no example value."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv(duck_shape=False)  # two sizes of 5 stay two symbols, as for K and V of a cache

    def size(name, value):
        return env.create_symintnode(env.create_symbol(value, ConstantSource(name)), hint=value)

    a, b, c = size("a", 5), size("b", 5), size("c", 6)
    assert not fusion_backend.known_equal(a, b)
    assert fusion_backend.guard_equal(a, b) and fusion_backend.known_equal(a, b)  # the guard now holds
    assert not fusion_backend.guard_equal(a, c)
    assert not fusion_backend.guard_equal(env.create_unbacked_symint(), env.create_unbacked_symint())
    assert fusion_backend.guard_equal(3, 3) and not fusion_backend.guard_equal(3, 4)


def test_the_documented_example_runs_as_written(capsys):
    # docs/authoring-rules.md's worked example, executed verbatim: a doc that no longer runs fails here
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "authoring-rules.md").read_text()
    example = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    try:
        exec(compile(example, "authoring-rules.md", "exec"), {})
        report = capsys.readouterr().out
        rows = [line.split() for line in report.splitlines() if "mylib.linear_gelu" in line.split()]
        assert rows and all(row[3] == "fused" for row in rows), report  # columns: # kind variant decision
    finally:
        unregister_rule("mylib.linear_gelu")
        torch._dynamo.reset()


def test_a_registered_rule_and_its_kind_may_be_disabled(user_rule):
    assert fusion_backend.parse_options({"disable": ["user.linear_gelu"]}).disable == ("user.linear_gelu",)
    assert fusion_backend.parse_options({"disable": ["custom"]}).disable == ("custom",)
    unregister_rule(user_rule.name)
    with pytest.raises(fusion_backend.OptionError, match="neither a rule name nor a kind"):
        fusion_backend.parse_options({"disable": ["user.linear_gelu"]})


def _misbehaving_rule(name, replacement, **kwargs):
    return Rule(name=f"user.{name}", kind="custom", pattern=lambda x, w, b: F.gelu(F.linear(x, w, b)),
                replacement=replacement, **kwargs)


class LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 16)

    def forward(self, x):
        return F.gelu(self.lin(x)) * 2 + x.sum(-1, keepdim=True)


def _kept_with_one_warning_and_eager_results(rule, reason):
    """The rule's site is kept with `reason` and one FusionWarning per compile, and the compiled
    model's output and input gradient are eager's."""
    register_rule(rule)
    try:
        model, x = LinearGelu(), torch.randn(2, 3, 8, requires_grad=True)
        with pytest.warns(fusion_backend.FusionWarning, match=reason) as caught:
            report = fusion_backend.explain(model, x, options=AGGRESSIVE_EAGER)
        assert len([w for w in caught if issubclass(w.category, fusion_backend.FusionWarning)]) == 1
        site = [s for s in report.sites if s.rule == rule.name][0]
        assert site.decision == "kept" and reason in site.reason, site
        torch._dynamo.reset()
        xc = x.detach().clone().requires_grad_()
        with pytest.warns(fusion_backend.FusionWarning, match=reason):
            out = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(xc)
        ref = model(x)
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(xc.grad, x.grad)
    finally:
        unregister_rule(rule.name)
        torch._dynamo.reset()


@pytest.mark.parametrize("returned, shown", [(None, "NoneType"), (0.5, "float"), ("dict", "dict")])
def test_a_replacement_returning_no_tensor_keeps_its_site(returned, shown):
    """None, a number or a dict spliced in for the site's result failed the compile with
    AttributeError ('NoneType' object has no attribute 'users')."""
    def replacement(x, w, b):
        return {"out": F.gelu(F.linear(x, w, b))} if returned == "dict" else returned

    _kept_with_one_warning_and_eager_results(_misbehaving_rule(f"returns_{shown}", replacement),
                                             f"replacement must return one tensor, not {shown}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_replacement_whose_result_is_not_floating_keeps_its_site(dtype):
    """Only a floating result is cast back to the site's floating dtype: an int32 result was cast
    back to float32 and the compiled model's output was off by up to 0.6 (gradients by as much)."""
    _kept_with_one_warning_and_eager_results(
        _misbehaving_rule(f"returns_{dtype}".replace("torch.", ""),
                          lambda x, w, b: F.gelu(F.linear(x, w, b)).to(dtype)),
        f"replacement's result is {dtype}, the matched result's torch.float32")


def _kept_near_miss_with_eager_results(rule, reason):
    """The rule's site is a near-miss with `reason`, and the compiled model gives eager's output."""
    register_rule(rule)
    try:
        model, x = LinearGelu(), torch.randn(2, 3, 8)
        report = fusion_backend.explain(model, x, options=AGGRESSIVE_EAGER)
        site = [s for s in report.sites if s.rule == rule.name][0]
        assert site.decision == "kept" and reason in site.reason, site
        str(report)
        torch._dynamo.reset()
        out = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(x)
        torch.testing.assert_close(out, model(x))
    finally:
        unregister_rule(rule.name)
        torch._dynamo.reset()


@pytest.mark.parametrize("returned", [True, False])
def test_a_constraint_returning_a_bool_keeps_its_site(returned):
    """A constraint answers None (fine) or a reason. A predicate's False read as fine, so a rule
    fused the sites its constraint was written to keep (and True made an explain row of a bool)."""
    def no_negative_outputs(m):
        return returned

    _kept_near_miss_with_eager_results(
        _misbehaving_rule(f"bool_constraint_{returned}", lambda x, w, b: -F.gelu(F.linear(x, w, b)),
                          constraints=[no_negative_outputs]),
        f"constraint no_negative_outputs returned {returned}, not None")


@pytest.mark.parametrize("argument, value, reason", [
    ("exact", lambda m: 1 / 0, "ZeroDivisionError"),
    ("configs", lambda m: 1 / 0, "ZeroDivisionError"),
    ("configs", lambda m: [1, 2], "configs returned 1 among its launch configs"),
    ("configs", lambda m: "abc", "configs returned 'abc', not a list"),
])
def test_a_rule_whose_exact_or_configs_fails_keeps_its_site(argument, value, reason):
    """exact raising failed the compile (BackendCompilerFailed), configs raising left the whole
    graph unfused ("graph analysis failed"), and integer configs failed the compile with KeyError."""
    def replacement(x, w, b, config=None):
        return F.gelu(F.linear(x, w, b))

    _kept_near_miss_with_eager_results(_misbehaving_rule(f"bad_{argument}", replacement, **{argument: value}),
                                       f"rule user.bad_{argument} could not describe the site: ")
    _kept_near_miss_with_eager_results(_misbehaving_rule(f"bad_{argument}", replacement, **{argument: value}), reason)


def test_a_replacement_that_cuts_the_gradient_keeps_its_site():
    """A replacement whose result does not require grad (a .detach(), torch.no_grad() inside it)
    was fused, and the compiled model trained without the gradient through the site: the input's
    gradient was off by 0.4 (only the path around the site reached it)."""
    _kept_with_one_warning_and_eager_results(
        _misbehaving_rule("detached", lambda x, w, b: F.gelu(F.linear(x, w, b)).detach()),
        "the replacement's result does not require grad where the matched result does")


@pytest.mark.parametrize("cut", ["x", "w", "b"])
def test_a_replacement_that_cuts_one_inputs_gradient_keeps_its_site(cut):
    """A replacement detaching one input (F.linear(x, w.detach(), b)) still returns a result that
    requires grad, through the others: it was fused, and the compiled model trained with no
    gradient for that input (the Linear's weight, say) where eager's had one."""
    def replacement(x, w, b):
        x, w, b = (t.detach() if name == cut else t for name, t in (("x", x), ("w", w), ("b", b)))
        return F.gelu(F.linear(x, w, b))

    _kept_with_one_warning_and_eager_results(
        _misbehaving_rule(f"cut_{cut}", replacement),
        f"the replacement's result carries no gradient to {cut}, where the matched result's does")


@pytest.mark.parametrize("field, value, named", [
    ("priority", "high", "must be a number"),
    ("kind", 5, "must be a non-empty string"),
    ("constraints", wide_enough, "must be a list of functions of a Match"),
    ("variant", 3, "must be None, a string or a function"),
    ("exact", "no", "must be True, False or a function"),
    ("configs", ["cublas"], "must be None or a function"),
    ("look_through_upcasts", ("nope",), "must be a list of the pattern's parameters (b, s, w, x)"),
    ("keeps_result_for_backward", "no", "must be True or False"),
])
def test_rule_fields_of_the_wrong_type_are_refused_when_the_rule_is_made(field, value, named):
    """Read only later, a priority of "high" made every graph's analysis fail (nothing fused in
    any model), a kind of 5 made options={"disable": [...]} raise for every rule, and a single
    constraint function outside a list failed the analysis of every graph where the pattern matched."""
    kwargs = {"name": "user.typed", "kind": "custom", "pattern": scaled_gelu_pattern,
              "replacement": scaled_gelu_replacement, field: value}
    with pytest.raises(TypeError, match=f"rule user.typed: {field}=.* {named}".replace("(", r"\(").replace(")", r"\)")):
        Rule(**kwargs)


def test_a_replacement_whose_result_is_narrower_than_the_sites_keeps_it():
    """The matcher looks through the model's fp16 -> fp32 cast between the pattern's two steps, so a
    replacement written as its own pattern summed fp16 x * s in fp16: inf where eager's fp32 sum of
    values near 1.5e5 is finite. A result narrower than the matched result's is not cast back."""
    def pattern(x, s):
        return torch.sum(torch.mul(x, s), -1)

    def replacement(x, s):
        return torch.sum(torch.mul(x, s), -1)

    def fn(x):
        return (x * 300).float().sum(-1)

    reason = "replacement's result is torch.float16, narrower than the matched result's torch.float32"
    register_rule(Rule(name="user.scaled_sum", kind="custom", pattern=pattern, replacement=replacement))
    try:
        x = (torch.rand(2, 512) + 0.5).half()
        with pytest.warns(fusion_backend.FusionWarning, match=reason):
            report = fusion_backend.explain(fn, x, options=AGGRESSIVE_EAGER)
        site = [s for s in report.sites if s.rule == "user.scaled_sum"][0]
        assert site.decision == "kept" and reason in site.reason, site
        torch._dynamo.reset()
        with pytest.warns(fusion_backend.FusionWarning, match=reason):
            out = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out, fn(x))
    finally:
        unregister_rule("user.scaled_sum")
        torch._dynamo.reset()


@pytest.mark.parametrize("helper", [
    lambda: fusion_backend.dtype_in("X", [torch.float32]),
    lambda: fusion_backend.rank_is("xx", 2),
    lambda: dims_equal("x", -1, "W", -1),
    lambda: fusion_backend.same_device("x", "bias"),
], ids=["dtype_in", "rank_is", "dims_equal", "same_device"])
def test_a_helper_constraint_naming_a_wildcard_the_pattern_lacks_is_refused(helper):
    """A typo'd wildcard in a helper (dtype_in("X", ...) for x) read as an absent one and passed at
    every site: a rule meant for fp32 fused an fp64 model through its fp32 replacement, 1e-7 off
    eager. Rule() names it; a rule whose constraints are swapped after that keeps its sites."""
    with pytest.raises(ValueError, match=r"reads wildcard '(X|xx|W|bias)', which the pattern does not have; "
                                         r"its wildcards are b, w, x"):
        _misbehaving_rule("typo", lambda x, w, b: F.gelu(F.linear(x.float(), w.float(), b.float())),
                          constraints=[helper()])
    rule = _misbehaving_rule("typo", lambda x, w, b: F.gelu(F.linear(x, w, b)))
    rule.constraints = [helper()]
    _kept_near_miss_with_eager_results(rule, "which the pattern does not have (its wildcards: b, w, x)")


@pytest.mark.parametrize("write", ["direct", "through_a_view"])
def test_a_replacement_writing_its_input_in_place_keeps_its_site(write):
    """A replacement scaling its input in place (x.mul_(s), to save a copy) was spliced into the
    graph as written: the compiled model's output was off (x read after the site saw x * s) and the
    caller's tensor was changed."""
    def pattern(x, s):
        return torch.tanh(torch.mul(x, s))

    def replacement(x, s):
        if write == "direct":
            return torch.tanh(x.mul_(s))
        x.view(-1).mul_(s)
        return torch.tanh(x)

    def fn(x):
        return torch.tanh(x * 3.0) + x

    reason = "the replacement writes its input x in place"
    register_rule(Rule(name="user.tanh_scaled", kind="custom", pattern=pattern, replacement=replacement))
    try:
        x = torch.randn(4, 5)
        with pytest.warns(fusion_backend.FusionWarning, match=reason):
            report = fusion_backend.explain(fn, x.clone(), options=AGGRESSIVE_EAGER)
        site = [s for s in report.sites if s.rule == "user.tanh_scaled"][0]
        assert site.decision == "kept" and reason in site.reason, site
        torch._dynamo.reset()
        xc = x.clone()
        with pytest.warns(fusion_backend.FusionWarning, match=reason):
            out = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(xc)
        torch.testing.assert_close(out, fn(x))
        assert torch.equal(xc, x)
    finally:
        unregister_rule("user.tanh_scaled")
        torch._dynamo.reset()


def test_a_pattern_calling_a_function_outside_the_canonical_vocabulary_matches_either_spelling():
    """F.layer_norm traced in a pattern passes weight, bias and eps by keyword, while Dynamo records
    nn.LayerNorm's call positionally: no pattern could match nn.LayerNorm. Calls are compared by
    parameter, defaults filled in, so an eps the pattern leaves at its default matches only it."""
    def pattern(x, s, g, b):
        return torch.relu(F.layer_norm(x, s, g, b))

    def replacement(x, s, g, b):
        calls["n"] += 1
        return torch.relu(F.layer_norm(x, s, g, b))

    register_rule(Rule(name="user.ln_relu", kind="custom", pattern=pattern, replacement=replacement))
    try:
        for eps, decisions in ((1e-5, ["fused"]), (1e-3, [])):
            model, x = torch.nn.Sequential(torch.nn.LayerNorm(8, eps=eps), torch.nn.ReLU()), torch.randn(2, 3, 8)
            with torch.no_grad():
                model[0].weight.uniform_(0.5, 1.5)
                model[0].bias.uniform_(-0.5, 0.5)
            report = fusion_backend.explain(model, x, options=AGGRESSIVE_EAGER)
            assert [s.decision for s in report.sites if s.rule == "user.ln_relu"] == decisions, report
            torch._dynamo.reset()
            before = calls["n"]
            xc = x.clone().requires_grad_()
            out = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(xc)
            assert (calls["n"] > before) == bool(decisions)
            xe = x.clone().requires_grad_()
            ref = model(xe)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(torch.autograd.grad(out.square().sum(), xc)[0],
                                       torch.autograd.grad(ref.square().sum(), xe)[0])
            torch._dynamo.reset()
    finally:
        unregister_rule("user.ln_relu")


@pytest.mark.parametrize("entry, loaded, warned", [
    ("RULES", False, "my_rules:RULES is a list ("),
    ("BY_NAME", False, "my_rules:BY_NAME is a dict ("),
    ("factory", True, "(my_rules:factory) returned a str ('plugin.other'), not a fusion_backend.Rule: skipped"),
])
def test_an_entry_point_naming_something_other_than_rules_warns(tmp_path, entry, loaded, warned):
    """An entry point naming a list or dict of rules (RULES = [...]) loaded no rule and said nothing,
    nor did a factory's items that are not rules."""
    (tmp_path / "my_rules.py").write_text(textwrap.dedent("""
        import torch
        from fusion_backend import Rule
        RULE = Rule(name="plugin.sigmoid_sigmoid", kind="custom", pattern=lambda x: torch.sigmoid(torch.sigmoid(x)),
                    replacement=lambda x: torch.sigmoid(torch.sigmoid(x)))
        RULES = [RULE]
        BY_NAME = {"sigmoid_sigmoid": RULE}
        def factory():
            return [RULE, "plugin.other"]
    """))
    dist = tmp_path / "my_rules-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{fusion_backend.ENTRY_POINT_GROUP}]\nsig = my_rules:{entry}\n")
    code = textwrap.dedent("""
        import warnings
        import fusion_backend
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = [r.name for r in fusion_backend.all_rules()]
        print("LOADED", "plugin.sigmoid_sigmoid" in names)
        for w in caught:
            print("WARNING", w.message)
    """)
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*sys.path, str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"LOADED {loaded}" in proc.stdout, proc.stdout
    assert any(line.startswith("WARNING truthfuse: ") and warned in line for line in proc.stdout.splitlines()), proc.stdout


def test_a_pattern_spelling_a_transpose_as_mT_matches():
    """`.mT` is one of the transposes canonicalized to transpose(-2, -1), but only where the rank was
    known to be 2 or more: in a pattern, whose nodes have no rank, `b.mT` stayed a getattr that no
    model's graph has, and the rule never matched."""
    def pattern(a, b):
        return torch.tanh(torch.matmul(a, b.mT))

    def replacement(a, b):
        calls["n"] += 1
        return torch.tanh(torch.matmul(a, b.transpose(-2, -1)))

    def fn(a, b):
        return torch.tanh(a @ b.transpose(1, 2)) * 2

    register_rule(Rule(name="user.tanh_mT", kind="custom", pattern=pattern, replacement=replacement))
    try:
        a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
        report = fusion_backend.explain(fn, a, b, options=AGGRESSIVE_EAGER)
        assert [s.decision for s in report.sites if s.rule == "user.tanh_mT"] == ["fused"], report
        torch._dynamo.reset()
        before = calls["n"]
        out = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(a, b)
        assert calls["n"] > before
        torch.testing.assert_close(out, fn(a, b))
    finally:
        unregister_rule("user.tanh_mT")
        torch._dynamo.reset()


def _first_item_tanh(t):
    return torch.tanh(t[0])


def _sigmoid_add_tanh(x, b):
    return torch.tanh(torch.add(torch.sigmoid(x), b))


@pytest.mark.parametrize("case", ["tuple_wildcard", "fake_from_replacement_args"])
def test_a_replacement_given_a_fake_value_that_is_no_input_keeps_its_site(case):
    """A pattern indexing chunk's result binds a wildcard to the tuple, and replacement_args can hand
    over Match.value_of(a covered node): either way the replacement computed with a fake tensor that
    is none of its inputs, make_fx baked it into the graph as a constant, and the compiled model
    failed when it ran (AssertionError: "Please convert all Tensors to FakeTensors first")."""
    if case == "tuple_wildcard":
        rule = Rule(name="user.fake_in", kind="custom", pattern=_first_item_tanh,
                    replacement=lambda t: torch.tanh(t[0]) * 1.0)
        reason = "wildcard t is bound to a tuple holding tensors"

        def fn(x, b):
            first, second = x.chunk(2, -1)
            return torch.tanh(first) * second + b
    else:
        rule = Rule(name="user.fake_in", kind="custom", pattern=_sigmoid_add_tanh,
                    replacement=lambda x, b, mid: torch.tanh(mid + b),
                    replacement_args=lambda m: {"mid": m.value_of(next(n for n in m.covered if n.target is torch.sigmoid))})
        reason = "the replacement uses a tensor that is none of its inputs"

        def fn(x, b):
            return torch.tanh(torch.sigmoid(x) + b) * 2
    register_rule(rule)
    try:
        x, b = torch.randn(3, 4), torch.randn(2 if case == "tuple_wildcard" else 4)
        with pytest.warns(fusion_backend.FusionWarning, match=reason) as caught:
            report = fusion_backend.explain(fn, x, b, options=AGGRESSIVE_EAGER)
        assert len([w for w in caught if issubclass(w.category, fusion_backend.FusionWarning)]) == 1
        site = [s for s in report.sites if s.rule == "user.fake_in"][0]
        assert site.decision == "kept" and reason in site.reason, site
        torch._dynamo.reset()
        with pytest.warns(fusion_backend.FusionWarning, match=reason):
            out = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(x, b)
        torch.testing.assert_close(out, fn(x, b))
    finally:
        unregister_rule("user.fake_in")
        torch._dynamo.reset()


def test_a_variant_function_returning_no_string_is_shown_as_one():
    """variant=lambda m: m.values["w"].shape[0] (a number) made str(explain(...)) raise TypeError
    ("object of type 'int' has no len()") for every report listing the site."""
    register_rule(_misbehaving_rule("int_variant", lambda x, w, b: F.gelu(F.linear(x, w, b)),
                                    variant=lambda m: m.values["w"].shape[0]))
    try:
        report = fusion_backend.explain(LinearGelu(), torch.randn(2, 3, 8), options=AGGRESSIVE_EAGER)
        site = [s for s in report.sites if s.rule == "user.int_variant"][0]
        assert (site.variant, site.decision) == ("16", "fused")
        assert any(row.split()[1:4] == ["custom", "16", "fused"] for row in str(report).splitlines()), str(report)
    finally:
        unregister_rule("user.int_variant")
        torch._dynamo.reset()


def _second_product_shares_its_scale(x, y, s):
    return torch.tanh(torch.add(torch.mul(x, s), maybe(torch.mul)(y, s)))  # x*s + [y*s]


def _relu_maybe(x):
    return torch.tanh(torch.add(maybe(torch.relu)(x), 1.0))


@pytest.mark.parametrize("pattern, replacement, fn", [
    (_second_product_shares_its_scale, lambda x, y, s: torch.tanh(x * s + (y if s is None else y * s)),
     lambda x, y: torch.tanh(x * 0.5 + y)),
    (_relu_maybe, lambda x: torch.tanh(torch.relu(x) + 1.0), lambda x, y: torch.tanh(x + 1.0) * y),
], ids=["shared_wildcard", "no_wildcard"])
def test_an_optional_step_without_a_wildcard_of_its_own_skips_the_rule(pattern, replacement, fn):
    """A skipped maybe(...) step shows only as its own wildcards being None. With none of its own (s
    bound by the other product, or none at all), the rule matched the model without the step and
    the replacement, unable to tell, computed it: tanh(x * 0.5 + y) as tanh(x * 0.5 + y * 0.5), 0.23
    off, and tanh(x + 1) as tanh(relu(x) + 1)."""
    register_rule(Rule(name="user.no_own_wildcard", kind="custom", pattern=pattern, replacement=replacement))
    try:
        x, y = torch.randn(8), torch.randn(8)
        with pytest.warns(UserWarning, match=r"rule user.no_own_wildcard is skipped: .*has no wildcard of its own"):
            report = fusion_backend.explain(fn, x, y, options=AGGRESSIVE_EAGER)
        assert not [s for s in report.sites if s.rule == "user.no_own_wildcard"]
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(x, y)
        torch.testing.assert_close(out, fn(x, y))
    finally:
        unregister_rule("user.no_own_wildcard")
        torch._dynamo.reset()


def _varargs_pattern(*args):
    return torch.tanh(torch.add(args[0], args[1]))


def _varkw_pattern(a, **kw):
    return torch.tanh(torch.add(a, kw["b"]))


@pytest.mark.parametrize("pattern, shown", [(_varargs_pattern, r"\*args"), (_varkw_pattern, r"\*\*kw")],
                         ids=["args", "kwargs"])
def test_a_pattern_with_star_args_is_refused_when_the_rule_is_made(pattern, shown):
    """A pattern written with *args (or **kwargs) traced to one placeholder bound to a tuple (dict),
    which no value of a model's graph is: the rule was accepted and never matched, silently."""
    with pytest.raises(ValueError, match=rf"the pattern's parameter {shown} is not supported; .*named parameters"):
        Rule(name="user.varargs", kind="custom", pattern=pattern,
             replacement=lambda **kw: torch.tanh(sum(kw.values())))
    # the same rule with named wildcards matches the model's x + y
    register_rule(Rule(name="user.varargs", kind="custom", pattern=lambda a, b: torch.tanh(torch.add(a, b)),
                       replacement=lambda a, b: torch.tanh(a + b)))
    try:
        x, y = torch.randn(3, 4), torch.randn(3, 4)
        report = fusion_backend.explain(lambda x, y: torch.tanh(x + y), x, y, options=AGGRESSIVE_EAGER)
        assert [s.decision for s in report.sites if s.rule == "user.varargs"] == ["fused"]
    finally:
        unregister_rule("user.varargs")
        torch._dynamo.reset()


def test_a_rule_saying_its_op_keeps_no_result_still_returns_a_copy_of_the_attention_ops():
    """keeps_result_for_backward=False on a rule whose replacement calls truthfuse's attention op
    (which saves its output for the backward) returned the op's own memory: a caller's in-place
    write to the compiled model's result, which eager allows after `p @ v`, failed the backward
    with autograd's "modified by an inplace operation". What the replacement's trace saves is seen
    whatever the rule says."""
    def pattern(q, k, v, s):
        return torch.softmax(torch.mul(q @ k.transpose(-2, -1), s), -1) @ v

    def replacement(q, k, v, s):
        return fusion_backend.ops.attention(q, k, v, scale=s)

    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v

    register_rule(Rule(name="user.no_kept_result", kind="user_attention", pattern=pattern,
                       replacement=replacement, priority=10_000, keeps_result_for_backward=False))
    try:
        torch.manual_seed(0)
        inputs = [torch.randn(2, 2, 8, 16) for _ in range(3)]
        report = fusion_backend.explain(f, *inputs, options=AGGRESSIVE_EAGER)
        assert [s.decision for s in report.sites if s.rule == "user.no_kept_result"] == ["fused"]

        def run(fn):
            xs = [x.clone().double().requires_grad_() if fn is f else x.clone().requires_grad_() for x in inputs]
            out = fn(*xs).mul_(2.0)
            (out * out).sum().backward()
            return [out.detach()] + [x.grad for x in xs]

        torch._dynamo.reset()
        got = run(torch.compile(f, backend=fusion_backend.backend(**AGGRESSIVE_EAGER)))
        for a, b in zip(got, run(f)):
            torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=2e-4)
    finally:
        unregister_rule("user.no_kept_result")
        torch._dynamo.reset()


def test_a_pattern_ending_in_a_method_call_matches_it():
    """A pattern ending in a method outside the canonical vocabulary (`.flip(-1)`, which Dynamo
    records as a method call too) was refused as not returning 'the result of one operation', and
    the rule skipped; and a pattern that canonicalizes to its own wildcard (neg(neg(x))) was
    refused with that message too, which does not say why."""
    def replacement(x):
        return torch.sigmoid(x).flip(-1)

    register_rule(Rule(name="user.sigmoid_flip", kind="custom", pattern=lambda x: torch.sigmoid(x).flip(-1),
                       replacement=replacement))
    register_rule(Rule(name="user.neg_neg", kind="custom", pattern=lambda x: torch.neg(torch.neg(x)),
                       replacement=lambda x: x))
    try:
        def fn(x):
            return torch.sigmoid(x * 2.0).flip(-1) * 3.0

        x = torch.randn(3, 5)
        with pytest.warns(UserWarning, match="rule user.neg_neg is skipped: pattern .*<lambda> canonicalizes to its "
                                             "wildcard x itself"):
            report = fusion_backend.explain(fn, x, options=AGGRESSIVE_EAGER)
        assert [s.decision for s in report.sites if s.rule == "user.sigmoid_flip"] == ["fused"]
        torch._dynamo.reset()
        xc, xe = x.clone().requires_grad_(), x.double().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))(xc)
        want = fn(xe)
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(out, want.float())
        torch.testing.assert_close(xc.grad, xe.grad.float())
    finally:
        unregister_rule("user.sigmoid_flip")
        unregister_rule("user.neg_neg")
        torch._dynamo.reset()
