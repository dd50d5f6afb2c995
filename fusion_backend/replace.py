"""Replacing a matched site by its rule's replacement.

The replacement function is traced with `make_fx` on the site's fake example values, so it may
look at shapes and dtypes like ordinary PyTorch code; the traced nodes (a truthfuse op call plus
any glue) are inlined into the graph in place of the matched nodes. A result laid out otherwise than
the matched result (the graph after the site was traced with that layout) is copied into it. If tracing fails (the op
rejects the shape, the rule has a bug), the site is kept and the caller reports why.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import guard_scalar
from torch.multiprocessing.reductions import StorageWeakRef

from .canonicalize.aliasing import alias_sources
from .canonicalize.passes import eliminate_dead_code, example_value, restore_spellings
from .match.constraints import known_equal
from .match.sites import Site

Node = fx.Node


class ReplacementError(Exception):
    """A site's replacement could not be built; the site is kept."""


def _fake_mode(values) -> Any:
    for v in values:
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def _concrete(value: Any) -> Any:
    """A symbolic Python scalar becomes its value, with a guard so a change recompiles."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return guard_scalar(value)
    return value


def _hint(size: Any) -> Optional[int]:
    """A size's value in the example the graph was traced with (None for a data-dependent one)."""
    if isinstance(size, torch.SymInt):  # node.hint: every torch this supports has it (None: unbacked)
        hint = size.node.hint
        return None if hint is None else int(hint)
    return int(size)


def _layout_order(value: Any, expected: Any) -> Optional[List[int]]:
    """None when the replacement's result (`value`) is laid out in memory as the matched result
    (`expected`, the value the graph after the site was traced with), dims of size 1 aside; else
    `expected`'s dims from outermost to innermost, for a copy of the result in that order.

    A fused op returns its result contiguous, but eager's may follow an input's layout (SDPA's
    output follows q's: (B, T, H, D) in memory for heads split by `view(B, T, H, D).transpose(1, 2)`),
    and code after the site may rely on it (a `.view` of the transpose). Both are dense, so the
    order of their dims is that of their strides, which the example's sizes show for every size
    the graph takes (Dynamo specializes sizes 0 and 1)."""
    if not isinstance(value, torch.Tensor) or not isinstance(expected, torch.Tensor) or value.dim() != expected.dim():
        return None
    if all(known_equal(n, 1) or known_equal(a, b) for n, a, b in zip(expected.shape, value.stride(), expected.stride())):
        return None
    sizes, got, want = ([_hint(x) for x in xs] for xs in (expected.shape, value.stride(), expected.stride()))
    if None in sizes + got + want:
        raise ReplacementError("the fused result's layout cannot be compared with the matched result's "
                               "(a data-dependent size)")
    moot = [n == 1 for n in sizes]
    if all(m or a == b for m, a, b in zip(moot, got, want)) or 0 in sizes:
        return None
    order = sorted(range(len(sizes)), key=lambda i: (-want[i], i))
    stride = 1
    for i in reversed(order):
        if not moot[i] and want[i] != stride:
            raise ReplacementError(f"the matched result's strides {tuple(expected.stride())} are not a dense "
                                   "layout, which the fused op's result could be copied into")
        stride *= sizes[i]
    return order


@contextlib.contextmanager
def _saved_for_backward():
    """The storages of the tensors autograd saves for the backward inside the block (a list,
    filled as they are saved). The backend suspends saved-tensor hooks while it compiles (the
    caller's must not see its traces); this block's own hook, on top of the stack, is the only one
    called inside it, so the suspension is lifted for it."""
    saved: list = []
    set_tracing = getattr(torch._C._autograd, "_saved_tensors_hooks_set_tracing", None)
    prior = set_tracing(False) if set_tracing is not None else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(StorageWeakRef(t.untyped_storage())) or t, lambda t: t):
            yield saved
    finally:
        if set_tracing is not None:
            set_tracing(prior)


def _inputs_reached(result: Any, inputs: Dict[str, Any]) -> set:
    """The names of the `inputs` (tensors) that `result`'s autograd graph reaches: the ones a
    backward from it sends a gradient. Read from the graph's edges (no backward runs): an input
    is reached as the output of its grad_fn it is (q, k, v chunked from one tensor share a
    grad_fn), or as the AccumulateGrad node of a leaf. The walk stops at the inputs, so it stays
    inside the site however large the graph above it.

    Nodes are compared as objects that this function holds until it returns: autograd hands out
    one Python object per node only while one is alive, so an id taken from a dropped object was
    reused by another node's and missed by the same node's next one. Kept by id, this check found
    no input reached on the GPU (where the allocator's reuse differed) and kept nearly every site."""
    if not isinstance(result, torch.Tensor) or result.grad_fn is None:
        return set()
    held: list = []  # every node object looked at, alive until the walk ends
    by_edge: Dict[tuple, List[str]] = {}
    input_nodes: set = set()
    leaves: Dict[int, List[str]] = {}
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            fn = t.grad_fn
            if fn is not None:
                held.append(fn)
                input_nodes.add(id(fn))
                by_edge.setdefault((id(fn), t.output_nr), []).append(name)
            else:
                leaves.setdefault(id(t), []).append(name)  # `inputs` holds the leaf itself
    root = result.grad_fn
    held.append(root)
    found: set = set(by_edge.get((id(root), result.output_nr), ()))
    if found:
        return found
    seen, stack = set(), [root]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)  # AccumulateGrad
        if variable is not None:
            found.update(leaves.get(id(variable), ()))
        for nxt, nr in fn.next_functions:
            if nxt is None:
                continue
            held.append(nxt)
            found.update(by_edge.get((id(nxt), nr), ()))
            if id(nxt) not in input_nodes:  # what lies above an input is no concern of the site's
                stack.append(nxt)
    return found


def trace_replacement(site: Site, config: Optional[str]) -> fx.GraphModule:
    """Trace the site's replacement into a small graph whose placeholders are the site's tensor
    bindings (in `tensor_names` order, stored on the returned module)."""
    rule, match = site.rule, site.match
    tensor_names = [n for n, v in match.values.items()
                    if isinstance(v, torch.Tensor) and isinstance(match.nodes.get(n), Node)]
    constants: Dict[str, Any] = {}
    for name, v in match.values.items():
        if name in tensor_names:
            continue
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(v)):
            # a pattern indexing a tuple (torch.tanh(t[0]) over chunk's result) binds the tuple; its
            # fake tensors, handed over as constants, were baked into the graph, which then failed
            # when the compiled model ran ("Please convert all Tensors to FakeTensors first")
            raise ReplacementError(f"replacement of {rule.name}: wildcard {name} is bound to a {type(v).__name__} "
                                   "holding tensors, which a replacement cannot take; write the pattern over "
                                   "the tensor itself (a wildcard for the item, not for the tuple it is taken from)")
        constants[name] = None if match.bindings.get(name) is None else _concrete(v)
    fakes = [match.values[n] for n in tensor_names]
    seen = {}
    for name, fake in zip(tensor_names, fakes):
        node = match.nodes[name]
        if seen.setdefault(id(fake), node) is not node:
            # make_fx would give both one placeholder and read one value for two different ones
            raise ReplacementError(f"replacement of {rule.name}: inputs {seen[id(fake)].name} and {node.name} "
                                   "share one example value")
    mode = _fake_mode(fakes) or _fake_mode([match.output])
    kwargs_extra = {"config": config} if rule.accepts_config() else {}
    if rule.replacement_args is not None:
        try:
            kwargs_extra.update(rule.replacement_args(match))
        except Exception as exc:  # noqa: BLE001 -- a rule's helper failing keeps the site
            raise ReplacementError(f"replacement_args of {rule.name} failed: {type(exc).__name__}: {exc}") from exc
    params = inspect.signature(rule.replacement).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())

    order: Optional[List[int]] = None
    result_grad: Dict[str, bool] = {}

    def call(*tensors):
        kwargs = dict(constants)
        kwargs.update(zip(tensor_names, tensors))
        if not takes_all:
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        with _saved_for_backward() as saved:
            out = rule.replacement(**kwargs, **kwargs_extra)
        first = out[0] if isinstance(out, (list, tuple)) and out else out
        if isinstance(first, torch.Tensor):  # autograd's view of the result, which the trace drops
            result_grad["requires_grad"] = first.requires_grad
            # an op that saves its result (truthfuse's attention: the row sums of dO * O) is seen
            # here whatever the rule says: a user rule calling the attention op with
            # keeps_result_for_backward=False returned the op's memory, and a caller's in-place
            # write there failed the backward with autograd's "modified by an inplace operation"
            result_grad["saved"] = StorageWeakRef(first.untyped_storage()) in saved
            result_grad["reaches"] = _inputs_reached(first, dict(zip(tensor_names, tensors)))
        if order is not None:  # eager's layout: contiguous in `order`, viewed back
            out = out[0] if isinstance(out, (list, tuple)) else out
            out = out.permute(order).contiguous().permute([order.index(i) for i in range(len(order))])
        return out

    def trace():
        from .site_timing import autocast_around

        try:
            with contextlib.ExitStack() as modes:
                # Under the autocast regions of the model's code that the site runs in, not only the
                # caller's: make_fx writes autocast's casts into the trace, so an nn.MultiheadAttention
                # inside `torch.autocast(..., enabled=False)` of a model called under autocast had its
                # Linears traced as bf16 products, and computed them so where eager's are fp32
                for args in autocast_around(site.anchor):
                    modes.enter_context(torch.autocast(*args))
                if mode is not None:
                    modes.enter_context(mode)
                return make_fx(call, tracing_mode="real")(*fakes)
        except Exception as exc:  # noqa: BLE001 -- any failure keeps the site
            raise ReplacementError(f"replacement of {rule.name} failed to build: "
                                   f"{type(exc).__name__}: {exc}") from exc

    traced = trace()
    order = _layout_order(_output_value(traced), match.output)
    if order is not None:
        traced = trace()
    traced.tensor_names = tensor_names
    traced.result_is_a_copy = order is not None  # not the op's own output memory
    traced.result_requires_grad = result_grad.get("requires_grad")
    traced.result_saved_for_backward = bool(result_grad.get("saved"))
    traced.result_reaches = result_grad.get("reaches")
    return traced


def _output_value(traced: fx.GraphModule) -> Any:
    """The fake value of a traced replacement's (single) result, None if it has none."""
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    result = out_node.args[0]
    if isinstance(result, (list, tuple)):
        result = result[0] if len(result) == 1 else None
    return result.meta.get("val") if isinstance(result, Node) else None


def _check_output(site: Site, traced: fx.GraphModule) -> Optional[torch.dtype]:
    """The replacement must produce the matched result's shape; returns a dtype to cast to when
    only the dtype differs."""
    out_node = next(n for n in traced.graph.nodes if n.op == "output")
    result = out_node.args[0]
    if isinstance(result, (list, tuple)):
        if len(result) != 1:
            raise ReplacementError("replacement must return one tensor")
        result = result[0]
    if not isinstance(result, Node):
        # None, a number or a dict: nothing the matched result's users could read (the splice
        # failed the compile with AttributeError on it)
        raise ReplacementError(f"replacement must return one tensor, not {type(result).__name__.replace('immutable_', '')}")
    value = result.meta.get("val")
    expected = site.match.output
    if not isinstance(expected, torch.Tensor):
        raise ReplacementError("matched site does not produce a tensor")
    if value is None:
        return None
    if value.dim() != expected.dim() or not all(known_equal(a, b) for a, b in zip(value.shape, expected.shape)):
        raise ReplacementError(f"replacement shape {tuple(value.shape)} differs from the matched "
                               f"result's {tuple(expected.shape)}")
    if value.dtype != expected.dtype and not (value.dtype.is_floating_point and expected.dtype.is_floating_point):
        # only a floating result is cast back (a rule computing in fp32 for a bf16 site); an integer
        # or bool result cast to the site's float dtype gave values eager never computed
        raise ReplacementError(f"replacement's result is {value.dtype}, the matched result's {expected.dtype}: only "
                               "a floating result is cast back to a floating dtype")
    if value.dtype != expected.dtype and torch.promote_types(value.dtype, expected.dtype) != value.dtype:
        # a narrower result cast back has lost what eager's kept: a plain-PyTorch replacement of
        # sum(x * s) on fp16 x, matched where the model upcasts x * s to fp32 before the sum (the
        # matcher looks through that cast), summed in fp16 and returned inf where eager's fp32 sum
        # of values near 1.5e5 was finite
        raise ReplacementError(f"replacement's result is {value.dtype}, narrower than the matched result's "
                               f"{expected.dtype}: casting it back would not restore the precision or range that eager's "
                               f"{expected.dtype} result keeps (the model may cast up inside the site, which the "
                               "matcher looks through); compute in at least the matched result's dtype")
    return expected.dtype if value.dtype != expected.dtype else None


def _written_input(traced: fx.GraphModule) -> Optional[str]:
    """The name of a tensor input that the traced replacement writes in place (directly or through
    a view of it), or None. The input is a value of the model's graph, read after the site by eager
    code (or the caller's own tensor): a replacement scaling q with `q.mul_(s)` changed the
    compiled model's output and the caller's input."""
    # each placeholder, and each view of one, -> the input's name
    alias_of = dict(zip((n for n in traced.graph.nodes if n.op == "placeholder"), traced.tensor_names))
    for node in traced.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if not isinstance(v, Node) or v not in alias_of or arg.alias_info is None:
                    continue
                if arg.alias_info.is_write:
                    return alias_of[v]
                if any(r.alias_info is not None for r in schema.returns):  # a view of the input
                    alias_of[node] = alias_of[v]
    return None


def build_replacement(site: Site, config: Optional[str]) -> tuple:
    """Trace and check a site's replacement without touching the target graph."""
    traced = trace_replacement(site, config)
    for node in traced.graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(traced, node.target, None), FakeTensor):
            # a fake value from the match (one that replacement_args or a closure handed over) is
            # no input of the trace: it would be baked into the graph, which fails when it runs
            raise ReplacementError("the replacement uses a tensor that is none of its inputs, a fake value "
                                   "from the match (Match.values or value_of, passed through replacement_args or "
                                   "a closure): take tensors as the pattern's wildcards")
    written = _written_input(traced)
    if written is not None:
        raise ReplacementError(f"the replacement writes its input {written} in place, which the graph (or the "
                               "caller) still reads as eager computed it; write to a copy")
    cast = _check_output(site, traced)
    expected = site.match.output
    if torch.is_grad_enabled() and expected.requires_grad and traced.result_requires_grad is False:
        # a detach, a no_grad region or a non-differentiable op inside the replacement: the fused
        # graph would train with no gradient through the site, where eager's flows
        raise ReplacementError("the replacement's result does not require grad where the matched result does "
                               "(a detach, no_grad or a non-differentiable op in it would cut the gradient)")
    if torch.is_grad_enabled() and expected.requires_grad and traced.result_reaches is not None:
        # one input's gradient cut (tanh(a + b.detach())): the result still requires grad through
        # the others, and b got no gradient in training where eager's had one
        values = {n: site.match.values[n] for n in traced.tensor_names}
        cut = sorted(_inputs_reached(expected, values) - traced.result_reaches)
        if cut:
            raise ReplacementError(f"the replacement's result carries no gradient to {', '.join(cut)}, where the "
                                   "matched result's does (a detach, no_grad or a non-differentiable op in it "
                                   "would cut that gradient)")
    return traced, cast


def inline_replacement(gm: fx.GraphModule, site: Site, traced: fx.GraphModule,
                       cast: Optional[torch.dtype]) -> Node:
    """Splice the traced replacement into `gm` before the site's anchor, route the anchor's users
    to it, and remove the matched nodes that are now dead."""
    graph = gm.graph
    anchor = site.anchor
    env: Dict[Node, Any] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    for ph, name in zip(placeholders, traced.tensor_names):
        env[ph] = site.match.bindings[name]
    result: Any = None
    stack_trace = anchor.meta.get("stack_trace")
    with graph.inserting_before(anchor):
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.op == "get_attr":
                value = getattr(traced, node.target)
                name = _unique_attr(gm, f"_truthfuse_const_{site.rule.name.replace('.', '_')}")
                if isinstance(value, torch.Tensor):  # a buffer, so that fx sees what get_attr reads
                    gm.register_buffer(name, value, persistent=False)
                else:
                    setattr(gm, name, value)
                new = graph.get_attr(name)
            else:
                new = graph.node_copy(node, lambda n: env[n])
                if new.target is torch.ops.aten.view.default:
                    # the trace chose a view from fake strides, which can differ from the real
                    # ones (batch_norm's output): reshape is that view where it can be, else a copy
                    new.target = torch.ops.aten.reshape.default
            new.meta = dict(node.meta)
            if stack_trace:
                new.meta["stack_trace"] = stack_trace
            if "val" in node.meta:
                new.meta["example_value"] = node.meta["val"]
            new.meta["truthfuse_site"] = site.id
            env[node] = new
        if isinstance(result, (list, tuple)):
            result = result[0]
        if cast is not None:
            # aten's cast, not prims.convert_element_type: that one has no autograd formula, and a
            # site whose op computes in another dtype than the graph's (fp32 q, k, v under
            # torch.autocast) then failed in backward
            result = graph.call_function(torch.ops.aten._to_copy.default, (result,), {"dtype": cast})
            result.meta["truthfuse_site"] = site.id
    anchor.replace_all_uses_with(result)
    keeps_result = site.rule.keeps_result_for_backward or getattr(traced, "result_saved_for_backward", False)
    if cast is None and keeps_result and not getattr(traced, "result_is_a_copy", False) and _returned(result):
        # An op that keeps its output for the backward (flash-style attention: the row sums of
        # dO * O) must not give the graph's caller that memory: an in-place op on what the compiled
        # model returned (out.mul_(2), which eager allows after `p @ v`) then failed the backward
        # with "modified by an inplace operation". The caller gets a copy (unless the result
        # already is one: cast, or copied into eager's layout).
        with graph.inserting_after(result):
            copy = graph.call_function(torch.ops.aten.clone.default, (result,))
        copy.meta = {k: v for k, v in result.meta.items() if k in ("val", "example_value", "stack_trace")}
        copy.meta["truthfuse_site"] = site.id
        result.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    covered = site.nodes  # a new set at each asking: asked once, not once per node of the graph
    for node in reversed(list(graph.nodes)):
        if node in covered and not node.users:
            graph.erase_node(node)
    return result


def _returned(result: Node) -> bool:
    """Whether the graph's output holds `result`'s memory: the node itself, or a value that may
    alias it (a view of it, an in-place op on it), reaches the output node."""
    seen, stack = set(), [result]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "output":
                return True
            if n in alias_sources(user):
                stack.append(user)
    return False


def _unique_attr(gm: fx.GraphModule, base: str) -> str:
    i = 0
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def apply_plan(gm: fx.GraphModule, sites: List[Site], plan: Dict[str, str],
               built: Dict[tuple, tuple]) -> List[str]:
    """Fuse the sites the plan chose (site id -> "keep" or "fuse:<config>"), using replacements
    already built in `built[(site id, config)]`. Returns the ids fused."""
    fused = []
    # Last anchor first: a site may take an earlier site's result as an input (two blocks in a
    # row), and inlining the earlier one first would erase the node the later one refers to;
    # the other way round, the earlier one's replace_all_uses_with reroutes the later op too.
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for site in sorted(sites, key=lambda s: -position.get(s.anchor, -1)):
        choice = plan.get(site.id, "keep")
        if choice == "keep":
            continue
        config = _config_of(choice)
        traced, cast = built[(site.id, config)]
        inline_replacement(gm, site, traced, cast)
        fused.append(site.id)
    restore_spellings(gm.graph)  # outside the fused sites, divisions, x * x and softmax(dtype=) as written
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return fused


def option_name(config: Optional[str]) -> str:
    """The tuner's name for fusing with a launch config (None: the op's default)."""
    return "fuse" if config is None else f"fuse:{config}"


def _config_of(choice: str) -> Optional[str]:
    return None if choice == "fuse" else choice.split(":", 1)[1]
