"""Which nodes of a Dynamo graph write memory in place, and which values may share memory.

A fused op reads its inputs where its site ends, so a write that eager runs between two of the
site's reads could be seen on the wrong side (`match.sites`), and an in-place op may only become
functional where nothing else sees the memory it writes (`passes._functionalize_inplace`). Both
need to know what may alias what, and a wrong "fresh" is a wrong result, so the analysis is
conservative: a value is fresh memory only when an op known to allocate made it
(`_FRESH_NAMES`); any other op's result may share memory with every tensor it was given.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx

Node = fx.Node

# Views, and ops that may hand back their input itself (a cast to the dtype it has, dropout in
# eval or at p=0, .contiguous() of a contiguous tensor) or a view of it: their result shares memory
# with their first argument only.
_FIRST_ARG_METHODS = {
    "view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten",
    "unflatten", "narrow", "select", "split", "chunk", "unbind", "t", "as_strided", "view_as",
    "__getitem__", "contiguous", "detach", "swapaxes", "swapdims", "movedim", "unfold",
    "to", "float", "half", "double", "bfloat16", "type", "type_as", "expand_as", "reshape_as", "cpu", "cuda",
}
_FIRST_ARG_FUNCTIONS = {
    operator.getitem, getattr, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze,
    torch.squeeze, torch.flatten, torch.narrow, torch.select, torch.split, torch.chunk,
    torch.unbind, torch.t, torch.swapaxes, torch.movedim, torch.detach, torch.Tensor.to,
}

# Views that read no data (a reshape or a cast may copy, and so read, where it stands): a value
# behind a chain of these is read where the chain is used.
_PURE_VIEW_METHODS = {"view", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "narrow",
                      "select", "split", "chunk", "unbind", "t", "as_strided", "view_as", "__getitem__", "detach",
                      "swapaxes", "swapdims", "movedim", "unflatten"}
_PURE_VIEW_FUNCTIONS = {operator.getitem, getattr, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
                        torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.t, torch.swapaxes,
                        torch.movedim, torch.detach}

# In-place ops that change a tensor's shape, strides or storage: the shapes Dynamo recorded before
# them no longer hold after, which no rewrite here accounts for
METADATA_WRITERS = frozenset({"t_", "transpose_", "swapaxes_", "swapdims_", "unsqueeze_", "squeeze_", "resize_",
                              "resize_as_", "as_strided_", "set_", "swap_"})

# Ops whose result is memory of its own, shared with nothing (arithmetic, products, reductions,
# activations, normalizations, constructors), by name: a torch function, a torch.nn.functional
# or torch.special one, or a Tensor method. Ops that may return an input unchanged in some case
# (dropout, contiguous, casts, einsum of one operand, atleast_*d, pad) are not here.
_FRESH_NAMES = frozenset("""
    add sub subtract rsub mul multiply div divide true_divide floor_divide remainder fmod neg negative
    matmul mm bmm baddbmm addmm addbmm addmv addcmul addcdiv outer dot mv linear bilinear
    softmax log_softmax exp exp2 expm1 log log2 log10 log1p sqrt rsqrt pow square reciprocal abs sign sgn
    sin cos tan tanh sinh cosh asin acos atan atan2 sigmoid logsigmoid erf erfc erfinv
    relu relu6 gelu silu mish elu selu celu leaky_relu hardtanh hardswish hardsigmoid softplus softsign
    tanhshrink threshold glu logit
    clamp clip clamp_min clamp_max maximum minimum where masked_fill lerp floor ceil round trunc frac
    eq ne lt le gt ge logical_not logical_and logical_or logical_xor bitwise_not bitwise_and bitwise_or
    bitwise_xor isnan isinf isfinite isclose
    sum mean amax amin prod cumsum cumprod logsumexp std var norm argmax argmin all any count_nonzero
    layer_norm group_norm rms_norm batch_norm instance_norm normalize local_response_norm
    embedding one_hot scaled_dot_product_attention conv1d conv2d conv3d conv_transpose1d conv_transpose2d
    cdist cosine_similarity pairwise_distance
    cat concat concatenate stack hstack vstack
    clone repeat repeat_interleave tile index_select gather masked_select take
    tril triu flip roll
    zeros ones full empty zeros_like ones_like full_like empty_like rand randn randint rand_like randn_like
    randint_like arange linspace new_empty new_zeros new_ones new_full new_tensor tensor
    cross_entropy nll_loss mse_loss l1_loss binary_cross_entropy binary_cross_entropy_with_logits
    """.split())
_FRESH_MODULES = ("torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                  "torch.special", "torch._C._special", "torch.linalg", "torch._C._linalg")
_FRESH_OPERATORS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.matmul, operator.neg, operator.invert, operator.and_, operator.or_, operator.xor, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.abs,
}

_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__",
                    "__delitem__"}
_OPERATOR_INPLACE = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                     operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                     operator.ixor, operator.ilshift, operator.irshift, operator.imatmul, operator.iconcat}


def _example(x: Any) -> Any:
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, Node) else x


def _may_hold_tensor(x: Any) -> bool:
    """A node whose value is, or may be, a tensor or a collection of them (not a known scalar)."""
    if not isinstance(x, Node):
        return False
    v = _example(x)
    return not isinstance(v, (int, float, bool, str, torch.SymInt, torch.SymFloat, torch.SymBool, torch.dtype,
                              torch.device))


def _tensor_nodes(*values: Any) -> List[Node]:
    """The nodes among `values`, looking into lists, tuples and dicts, that may hold tensors."""
    out: List[Node] = []
    fx.node.map_aggregate(values, lambda a: out.append(a) if _may_hold_tensor(a) else None)
    return out


@functools.lru_cache(maxsize=None)
def _inplace_position(target) -> Optional[int]:
    """The position of an `inplace` parameter of `target` (F.relu(x, True)), or None."""
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _schemas(target) -> list:
    """The schemas of a torch.ops operator: one for an OpOverload, every overload's for a packet
    (`torch.ops.aten.mul_`, a library op called without an overload)."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return [schema]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, name)._schema for name in target.overloads()]
    return []


def _writes(arg) -> bool:
    """A tensor argument a schema marks written in place (`Tensor(a!)`, `Tensor(a!)[]`), not a
    keyword-only `out=` (an `.out` overload's, found by the `out=` keyword itself) nor a list of
    numbers (TorchScript's in-place `sort.int`)."""
    return (arg.alias_info is not None and arg.alias_info.is_write and not arg.kwarg_only
            and "Tensor" in str(arg.type))


def _fits(is_list: bool, value) -> bool:
    """Whether a call's argument can be the schema's: a list for a list type (`is_list`), not for a
    tensor (an aten namesake's overloads include TorchScript's `sort.Tensor(Tensor[](a!) self)`)."""
    return isinstance(value, (list, tuple)) == is_list


def _schema_written(node: Node, target) -> Optional[List[Node]]:
    """The arguments some schema of `target` (`_own_or_aten_schemas`) marks written (`Tensor(a!)`),
    or None where none writes."""
    written, any_write = [], False
    for i, name, is_list in _written_arguments(target):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
        if value is not None and _fits(is_list, value):
            any_write = True
            written.extend(_tensor_nodes(value))
    return written if any_write else None


def _written_arguments(target) -> tuple:
    """(position, name, is a list) of each argument that some schema of `target` marks written
    (`_writes`), in the schemas' order; cached per target. Reading the schemas' argument types
    (`str(arg.type)`) for every node was most of what `mutates` cost: a 12-layer T5's graph asks
    it ten thousand times (the tuner's short-producer walks among them)."""
    try:
        return _written_arguments_cached(target)
    except TypeError:  # unhashable
        return _written_arguments_of(_schemas(target))


@functools.lru_cache(maxsize=4096)
def _written_arguments_cached(target) -> tuple:
    return _written_arguments_of(_own_or_aten_schemas(target))


def _written_arguments_of(schemas: list) -> tuple:
    return tuple((i, arg.name, str(arg.type).startswith("List"))
                 for schema in schemas for i, arg in enumerate(schema.arguments) if _writes(arg))


def _name(target) -> str:
    return getattr(target, "__name__", "") or ""


def _special_writes(node: Node) -> Optional[List[Node]]:
    """Writes that neither a name nor a schema tells: batch and instance norm update the running
    statistics they are given (every spelling: F.batch_norm, torch.native_batch_norm, aten ops
    whose schemas do not mark it), embedding with max_norm renormalizes its weight's rows, and a
    higher-order op (checkpoint, a user Triton kernel) may write whatever it is given when its body
    writes anything (or cannot be read). None: not such a call."""
    target = node.target
    name = _name(target) or str(target)
    if "batch_norm" in name or "instance_norm" in name:
        return _tensor_nodes(node.args[1:], node.kwargs)  # all but the input
    if name in ("embedding", "embedding_bag") and getattr(target, "__module__", None) == "torch.nn.functional":
        try:
            bound = inspect.signature(target).bind(*node.args, **node.kwargs).arguments
        except (TypeError, ValueError):
            return _tensor_nodes(node.args, node.kwargs)
        return _tensor_nodes(bound.get("weight")) if bound.get("max_norm") is not None else None
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _tensor_nodes(node.args, node.kwargs) if _body_may_write(node) else None
    return None


def _body_may_write(node: Node) -> bool:
    """Whether a higher-order op's subgraphs (get_attr'd modules of the owning module) may write:
    True when one has a mutating node, or when the op has no subgraph this can read."""
    owner = node.graph.owning_module
    bodies = []
    for arg in _tensor_nodes(node.args, node.kwargs) + [a for a in node.all_input_nodes if a.op == "get_attr"]:
        if arg.op == "get_attr" and owner is not None:
            sub = getattr(owner, arg.target, None)
            if isinstance(sub, fx.GraphModule):
                bodies.append(sub)
    if not bodies:
        return True
    return any(mutates(n) for body in bodies for n in body.graph.nodes)


def _own_or_aten_schemas(target) -> list:
    """`_schemas` of the target, else of the aten operator a torch function stands for, by name
    (`torch._fused_adam_` is `aten._fused_adam_`); cached per target."""
    try:
        return _schemas_cached(target)
    except TypeError:  # unhashable
        return _schemas(target)


@functools.lru_cache(maxsize=4096)
def _schemas_cached(target) -> list:
    own = _schemas(target)
    if own or getattr(target, "__module__", None) not in _FRESH_MODULES or not _name(target):
        return own
    try:
        return _schemas(getattr(torch.ops.aten, _name(target)))
    except (AttributeError, RuntimeError):
        return []


def mutates(node: Node) -> bool:
    """Whether a call may write into one of its arguments: in-place methods (`relu_`, `__iadd__`)
    and functions (`torch.relu_`, `operator.imul`, item assignment, `torch._foreach_add_`), `out=`,
    `inplace=True` given by keyword or by position, batch and instance norm given running
    statistics, and torch.ops operators whose schema writes an argument (`aten.mul_.Scalar`, a
    library op declared with `Tensor(a!)`)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace") is True:
        return True
    target = node.target
    if node.op == "call_method":
        return isinstance(target, str) and ((target.endswith("_") and not target.endswith("__"))
                                            or target in _INPLACE_DUNDERS)
    try:
        if target in _OPERATOR_INPLACE:
            return True
    except TypeError:  # an unhashable callable
        return False
    special = _special_writes(node)
    if special is not None:
        return True
    if _schema_written(node, target) is not None:
        return True
    position = _inplace_position(target) if callable(target) else None
    if position is not None and len(node.args) > position and node.args[position] is True:
        return True
    if getattr(target, "__module__", None) in ("_operator", "operator"):  # and_, or_, not_ are pure
        return False
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def write_targets(node: Node) -> List[Node]:
    """The values a mutating call (`mutates`) writes: its `out=`, the special writes
    (`_special_writes`), the arguments its schema (or its aten namesake's) marks written; for a
    method, an operator or `inplace=True`, its first argument; for another function named like an
    in-place op, every tensor argument."""
    out = node.kwargs.get("out")
    if out is not None:
        return _tensor_nodes(out)
    if node.op == "call_function":
        special = _special_writes(node)
        if special is not None:
            return special
        written = _schema_written(node, node.target)
        if written is not None:
            return written
        if node.target not in _OPERATOR_INPLACE and node.kwargs.get("inplace") is not True:
            # a function named like an in-place op, with no schema to say which argument it
            # writes (`torch._foreach_add_`'s lists): any of them
            return _tensor_nodes(node.args, node.kwargs)
    return _tensor_nodes(node.args[0]) if node.args else []


def _fresh_op(node: Node) -> bool:
    target = node.target
    if node.op == "call_method":
        return target in _FRESH_NAMES
    try:
        if target in _FRESH_OPERATORS:
            return True
    except TypeError:
        return False
    return getattr(target, "__name__", None) in _FRESH_NAMES and getattr(target, "__module__", None) in _FRESH_MODULES


def alias_sources(node: Node) -> List[Node]:
    """The values whose memory `node`'s value may share: none for a fresh result (`_FRESH_NAMES`,
    indexing by a tensor of one or more dims, which copies), the written values for an in-place call (it returns its
    target), the first argument for a view or an op that may return its input, and otherwise every
    tensor argument."""
    if node.op in ("placeholder", "get_attr", "output") or node.op not in ("call_function", "call_method"):
        return []
    if mutates(node):
        return write_targets(node)
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) > 1:
        index = node.args[1] if isinstance(node.args[1], (tuple, list)) else (node.args[1],)
        # advanced indexing (a tensor of at least one dim) copies; a 0-d integer tensor is a
        # basic index, a view
        if any(isinstance(i, Node) and isinstance(_example(i), torch.Tensor) and _example(i).dim() > 0
               for i in index):
            return []
    if _fresh_op(node):
        return []
    first = (node.op == "call_method" and node.target in _FIRST_ARG_METHODS) or \
        (node.op == "call_function" and _hashable_in(node.target, _FIRST_ARG_FUNCTIONS))
    if first:
        return _tensor_nodes(node.args[0]) if node.args else []
    return _tensor_nodes(node.args, node.kwargs)


def _hashable_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:
        return False


def is_fresh(node: Any) -> bool:
    """A value computed inside the graph into memory nothing else shares (`alias_sources` empty)."""
    return (isinstance(node, Node) and node.op in ("call_function", "call_method") and not mutates(node)
            and not alias_sources(node))


def _storage_key(value: Any):
    try:
        return value.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 -- no storage to compare (a sparse or subclass value)
        return None


def shared_storage_inputs(graph: fx.Graph) -> Dict[Node, List[Node]]:
    """Graph inputs (placeholders, attributes) whose example values share storage: Dynamo passes
    two views of one tensor as separate inputs, and a write through one changes the other. An
    input without a storage to compare may share with any input."""
    by_key: Dict[Any, List[Node]] = {}
    unknown: List[Node] = []
    inputs = [n for n in graph.nodes if n.op in ("placeholder", "get_attr")]
    for n in inputs:
        v = _example(n)
        if not isinstance(v, torch.Tensor):
            continue
        key = _storage_key(v)
        if key is None:
            unknown.append(n)
        else:
            by_key.setdefault(key, []).append(n)
    peers: Dict[Node, List[Node]] = {}
    tensors = [n for group in by_key.values() for n in group] + unknown
    for group in by_key.values():
        for n in group:
            peers[n] = [m for m in group if m is not n] + unknown
    for n in unknown:
        peers[n] = [m for m in tensors if m is not n]
    return peers


def sharing_memory(values, peers: Optional[Dict[Node, List[Node]]] = None) -> set:
    """`values` and every value that may share memory with one of them: up through
    `alias_sources`, down through the users that may alias, and across graph inputs that share
    storage (`peers`, from `shared_storage_inputs`)."""
    found, stack = set(), list(values)
    while stack:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        stack.extend(alias_sources(n))
        stack.extend(u for u in n.users if n in alias_sources(u))
        if peers:
            stack.extend(peers.get(n, ()))
    return found


def written_family(node: Node, peers: Optional[Dict[Node, List[Node]]] = None) -> set:
    """The values whose memory the mutating `node` may write: `sharing_memory` of its targets."""
    return sharing_memory(write_targets(node), peers)


def changes_metadata(node: Node) -> bool:
    """An in-place op that changes a tensor's shape, strides or storage (`METADATA_WRITERS`)."""
    if node.op == "call_method":
        return node.target in METADATA_WRITERS
    if node.op == "call_function":
        return _name(node.target).split(".")[0] in METADATA_WRITERS
    return False


def _pure_view(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_VIEW_METHODS
    return node.op == "call_function" and _hashable_in(node.target, _PURE_VIEW_FUNCTIONS) and not (
        node.target is operator.getitem and not alias_sources(node))  # an advanced index copies


def read_where_used(node: Node) -> set:
    """The values `node` reads where it stands: its inputs, and the values behind inputs that are
    chains of pure views (which read nothing themselves)."""
    found, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        if _pure_view(n):
            stack.extend(n.all_input_nodes[:1])
    return found
