"""Per-layer choices of the integer model: IPTQ-ViT's unified metric, as this plugin defines it.

IPTQ-ViT (seed 003) gives each non-linear layer the approximation that scores best on a metric that
unites quantization sensitivity, output perturbation and computational cost; the paper publishes no
code, so the terms and their weights here are ours (docs/architecture.md).

Stage 1, score (:func:`score_variants`, :func:`score_weight_bits`), on calibration images, for each site
(a GELU, a softmax, a Linear / Conv2d of a calibrated prepared graph) and each candidate:

* **sensitivity**: ``||y_c - y||^2 / ||y||^2``, summed over the images, of the model's final output when
  only this site runs the candidate and everything else stays float;
* **perturbation**: the same ratio for the site's own output against its float op;
* **cost**: the candidate's integer operations per input element, counted (the aten ops of its deployed
  module on the ``intops`` reference path, weighted by the elements each writes); for weight widths,
  the bytes of the weights.

A candidate runs as it will be deployed: the input quantized on its observed grid, the registry's
deployed module on those integers (the fake-quant path: one arithmetic), its output on the grid the
lowering will give it; an INT4 candidate is the weight quantized as the lowering quantizes it.

Stage 2, assign: a GELU / softmax site takes the candidate with the largest
``score = -(w_s * s / max s + w_p * p / max p + w_c * c / max c)`` (each term divided by its largest
value over the site's candidates; weights :class:`MetricWeights`). Weight widths with a size budget
(:func:`assign_weight_bits`): INT4 goes first to the GEMMs with the least ``w_s * s + w_p * p`` (each
term over its largest value among the GEMMs) per byte saved, until the GEMM weights are ``size_ratio``
times smaller than in FP32. GEMMs under the module paths of ``int8_weights`` (:func:`keep_int8`) stay INT8
whatever the width asked for. The choices are written into the sites' observers (``variant``,
``weight_bits``), which the lowering reads and the state dict carries.

Stage 3, calibrate: the conversion computes each site's constants for its chosen candidate (Poly-GELU
fits its polynomial then). The observers record float activations, which no choice changes, so the
ranges of stage 1 are already those of the mixed model: no second pass over the images is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call

from . import intops, kernels
from .deploy.audit import OpAudit
from .gptq import gptq
from .lowering import consumer_bits, feeds_output, output_grid, static_nodes
from .ops import REGISTRY
from .ops.entries import WEIGHT_BITS, input_energy, quantize_weight
from .ops.grid import Grid
from .ops.site import NodeCall
from .ops.modules import storage_dtype
from .sites import CHOICES, GEMMS, ChoiceSite, Probe, is_observer, sites  # noqa: F401 - the public names of choices

SCORE_IMAGES = 2  # calibration images the candidates are scored on (each candidate runs the whole model)
ROUNDING_IMAGES = 8  # calibration images whose GEMM inputs GPTQ takes (one float forward each)
SELECTS = ("global", "unified")  # the quant dict's options (check_quant)
WEIGHT_CHOICES = (8, 4, "mixed")
ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True)
class MetricWeights:
    """Weights of the unified metric's terms. Defaults: the model's output decides (sensitivity 1.0), the
    layer's own error breaks near-ties (0.5; it is measured on one layer, so it is a noisier signal of
    the model's error), cost matters least (0.1: every candidate runs in one fused pass when deployed)."""

    sensitivity: float = 1.0
    perturbation: float = 0.5
    cost: float = 0.1


def _relative_error(approx: Tensor, exact: Tensor) -> float:
    exact = exact.double()
    return float(((approx.double() - exact) ** 2).sum() / (exact**2).sum().clamp_min(1e-30))


def module_path(prepared: fx.GraphModule, node: fx.Node) -> str:
    """The path of the module an op of a prepared graph belongs to: a called module's own target; for a function
    call, the innermost module of its ``nn_module_stack`` (PT2E) or of torch.ao's ``prepare_fx`` scopes."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if stack:
        return next(reversed(stack.values()))[0]
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    scopes = getattr(attrs, "node_name_to_scope", {}) if attrs is not None else {}
    return scopes.get(node.name, ("", None))[0]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def keep_int8(prepared: fx.GraphModule, prefixes) -> list[str]:
    """Pin the GEMMs (Linear / Conv2d) under the module paths ``prefixes`` (e.g. ``["decode_head"]``) of a
    prepared graph (FX or PT2E) to INT8 weights: what W4A8 models commonly keep for the task head. Returns the
    pinned sites' names; a prefix under which there is no GEMM is an error naming the model's top modules."""
    paths = [(site, module_path(prepared, site.node)) for site in sites(prepared, GEMMS)]
    pinned = []
    for prefix in prefixes:
        matched = [site for site, path in paths if _under(path, prefix)]
        if not matched:
            tops = sorted({path.split(".")[0] for _, path in paths})
            raise ValueError(f"int8_weights: no Linear / Conv2d under {prefix!r}; the model's GEMMs are under {tops}")
        for site in matched:
            site.observer.weight_bits = 8
            pinned.append(site.node.name)
    return pinned


def _consumer_rules(prepared: fx.GraphModule) -> tuple[tuple, set[fx.Node]]:
    """:func:`consumer_bits` / :func:`feeds_output`'s rules for a prepared graph (entry_of, transparent, ignored)
    and its static values."""
    static = static_nodes(prepared.graph)
    return (lambda n: REGISTRY.entry_for(n, prepared), lambda n: is_observer(prepared, n), lambda n: n in static), static


def _deployed_candidate(prepared: fx.GraphModule, site: ChoiceSite, variant) -> tuple[nn.Module, float, int, float]:
    """The deployed module of ``variant`` at ``site`` as the lowering would build it: (module, input scale,
    input width, output scale)."""
    entry = REGISTRY[site.entry]
    bits = entry.input_bits
    in_scale = site.input_observer.scale(bits)
    inputs = (Grid.of(in_scale, intops.int_range(bits)),)
    attributes = entry.read(NodeCall(site.node, prepared))
    if site.entry == "softmax":
        probabilities = Grid.probabilities()
        return variant.build(attributes, inputs, None), in_scale, bits, probabilities.scale
    out_node = next(u for u in site.node.users if is_observer(prepared, u))
    rules, static = _consumer_rules(prepared)
    out = Grid.of(*output_grid(site.observer, consumer_bits(out_node, *rules), asymmetric=not site.observer.symmetric,
                               output=feeds_output(out_node, *rules, static)))
    module = variant.build(dict(attributes, samples=site.input_observer.samples), inputs, out)
    return module, in_scale, bits, out.scale


def _integer_input(x: Tensor, scale: float, bits: int) -> Tensor:
    return intops.quantize(x.double(), torch.tensor(scale, dtype=torch.float64), bits)


def ops_per_element(module: nn.Module, x_int: Tensor) -> float:
    """Integer operations per input element of a deployed module on ``x_int`` (float tensor holding
    integers), counted on the intops reference path: every aten op, weighted by the elements it writes."""
    x = x_int.to(storage_dtype((int(x_int.min()), int(x_int.max()))))
    with kernels.reference(), OpAudit() as audit, torch.no_grad():
        module(x)
    return sum(r.elements for r in audit.records) / x.numel()


def _run(prepared, inputs, node=None, replace=None) -> tuple[list[Tensor], float]:
    """The outputs on each input tuple and the summed perturbation of ``node``'s output."""
    outputs, perturbation = [], 0.0
    with torch.no_grad():
        for args in inputs:
            probe = Probe(prepared, node, replace)
            outputs.append(probe.run(*args))
            if node is not None:
                perturbation += _relative_error(probe.approx, probe.exact)
    return outputs, perturbation


def _sensitivity(outputs: list[Tensor], reference: list[Tensor]) -> float:
    return sum(_relative_error(o, r) for o, r in zip(outputs, reference))


def _require_calibrated(found: list[ChoiceSite]) -> None:
    for site in found:
        for observer in (site.observer, site.input_observer):
            if observer is not None and not observer.calibrated():
                raise ValueError(f"{site.node.name}: its observers saw no data; calibrate the prepared model "
                                 "before scoring candidates")


def score_variants(prepared: fx.GraphModule, inputs: list[tuple], weights: MetricWeights = MetricWeights(),
                   entries=CHOICES) -> list[dict]:
    """Stage 1 and 2 for the GELU / softmax sites of a calibrated prepared graph: one row per (site,
    candidate) with its terms, score and whether it is chosen (the largest score of its site)."""
    if not inputs:
        raise ValueError("scoring needs at least one calibration input")
    found = [s for s in sites(prepared, entries) if s.input_observer is not None]
    _require_calibrated(found)
    reference, _ = _run(prepared, inputs)
    rows = []
    for site in found:
        entry = REGISTRY[site.entry]
        site_rows = []
        for variant in entry.variants.values():
            module, in_scale, bits, out_scale = _deployed_candidate(prepared, site, variant)

            first_input = []  # the integers the candidate reads on the first image: its op count is taken on them

            def replace(args, kwargs, exact, module=module, in_scale=in_scale, bits=bits, out_scale=out_scale,
                        first_input=first_input):
                x_int = _integer_input(args[0], in_scale, bits)
                if not first_input:
                    first_input.append(x_int)
                return (module(x_int) * out_scale).to(exact.dtype)

            outputs, perturbation = _run(prepared, inputs, site.node, replace)
            site_rows.append(dict(layer=site.node.name, kind=site.entry, candidate=variant.name,
                                  sensitivity=_sensitivity(outputs, reference), perturbation=perturbation,
                                  cost=ops_per_element(module, first_input[0])))
        rows += _ranked(site_rows, weights)
    return rows


def _ranked(rows: list[dict], weights: MetricWeights) -> list[dict]:
    terms = (("sensitivity", weights.sensitivity), ("perturbation", weights.perturbation), ("cost", weights.cost))
    top = {term: max(r[term] for r in rows) or 1.0 for term, _ in terms}
    for r in rows:
        r["score"] = -sum(w * r[term] / top[term] for term, w in terms)
    best = max(rows, key=lambda r: r["score"])  # (ties: the registry's order, default first)
    for r in rows:
        r["chosen"] = r is best
    return rows


def score_weight_bits(prepared: fx.GraphModule, inputs: list[tuple], low_bits: int = 4) -> list[dict]:
    """Stage 1 for the GEMM weights: per Linear / Conv2d, the terms of its weights at ``low_bits``
    (the rest of the model float); ``cost``: the weight bytes at 8 bits (what INT4 halves)."""
    if low_bits not in WEIGHT_BITS:
        raise ValueError(f"weight widths are {WEIGHT_BITS}, got {low_bits}")
    found = sites(prepared, GEMMS)
    _require_calibrated(found)
    reference, _ = _run(prepared, inputs)
    rows = []
    for site in found:
        module = prepared.get_submodule(site.node.target) if site.node.op == "call_module" else None
        numel = {}

        def replace(args, kwargs, exact, module=module, numel=numel, node=site.node, into=site.input_observer):
            w = module.weight if module is not None else args[1]
            numel["weights"] = w.numel()
            w_int, scale = quantize_weight(w, low_bits, input_energy(into, w))
            low = (w_int.double() * scale[:, None]).reshape(w.shape).to(w.dtype)
            if module is not None:
                return functional_call(module, {"weight": low}, args, kwargs)
            return node.target(args[0], low, *args[2:], **kwargs)

        outputs, perturbation = _run(prepared, inputs, site.node, replace)
        rows.append(dict(layer=site.node.name, kind="weights", candidate=f"int{low_bits}", numel=numel["weights"],
                         sensitivity=_sensitivity(outputs, reference), perturbation=perturbation,
                         cost=numel["weights"]))
    return rows


def assign_weight_bits(rows: list[dict], size_ratio: float | None, weights: MetricWeights = MetricWeights(),
                       low_bits: int = 4, pinned=()) -> list[dict]:
    """Stage 2 for the weights: ``size_ratio`` None puts every GEMM at ``low_bits``; otherwise INT4 goes to
    the GEMMs with the least metric per byte saved until the GEMM weights are ``size_ratio`` times smaller
    than in FP32 (4 bytes a weight). The layers named in ``pinned`` stay INT8 (their bytes count). Marks each
    row ``chosen`` (INT4) and returns the rows."""
    if size_ratio is not None and size_ratio <= 0:
        raise ValueError(f"size_ratio must be positive, got {size_ratio}")
    total = sum(r["numel"] for r in rows)
    budget = 0.0 if size_ratio is None else 4.0 * total / size_ratio  # bytes the GEMM weights may take
    top = {t: max((r[t] for r in rows), default=0.0) or 1.0 for t in ("sensitivity", "perturbation")}
    for r in rows:
        r["score"] = -(weights.sensitivity * r["sensitivity"] / top["sensitivity"]
                       + weights.perturbation * r["perturbation"] / top["perturbation"])
        r["chosen"] = False
    size = float(total)  # bytes with every weight at 8 bits
    for r in sorted((r for r in rows if r["layer"] not in pinned), key=lambda r: -r["score"] / r["numel"]):
        if size <= budget:
            break
        r["chosen"] = True
        size -= r["numel"] * (8 - low_bits) / 8
    return rows


def apply(prepared: fx.GraphModule, rows: list[dict]) -> None:
    """Write the chosen candidates into the sites' observers (the lowering reads them from there)."""
    by_name = {site.node.name: site for site in sites(prepared)}
    for r in rows:
        if not r["chosen"] and r["kind"] != "weights":
            continue
        site = by_name.get(r["layer"])
        if site is None:
            raise ValueError(f"no site {r['layer']!r} in this model: the choices were made on another graph")
        if r["kind"] == "weights":
            site.observer.weight_bits = int(r["candidate"][3:]) if r["chosen"] else 8
        else:
            site.observer.variant = r["candidate"]


def format_table(rows: list[dict]) -> str:
    """The choices as a markdown table: layer, candidate, the metric terms, the score, the chosen mark."""
    lines = ["| layer | kind | candidate | sensitivity | perturbation | cost | score | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = f"{r['cost'] / 1e3:.1f} kB" if r["kind"] == "weights" else f"{r['cost']:.1f} ops/el"
        lines.append(f"| {r['layer']} | {r['kind']} | {r['candidate']} | {r['sensitivity']:.3e} | "
                     f"{r['perturbation']:.3e} | {cost} | {r['score']:.3f} | {'**yes**' if r['chosen'] else ''} |")
    return "\n".join(lines)



def check_quant(quant: dict) -> dict:
    """A ``quant=`` dict (mmseg config, ``iseg ptq`` options) checked and completed: ``gelu`` / ``softmax``
    (registry variants: the global choice, and the start of a unified selection), ``weight_bits`` (8, 4 or
    "mixed"), ``select`` ("global" or "unified": per-layer GELU / softmax), ``size_ratio`` (FP32 / GEMM weight
    size that "mixed" reaches, default 6), ``weight_rounding`` of INT4 weights ("gptq", default, or "nearest";
    in QAT, the trained weights start at GPTQ's integers and round to nearest on its scales), ``int8_weights`` (module
    paths whose GEMMs keep INT8 weights at W4 / mixed, e.g. ``["decode_head"]``; default none)."""
    known = ("gelu", "softmax", "weight_bits", "select", "size_ratio", "weight_rounding", "int8_weights")
    unknown = sorted(set(quant) - set(known))
    if unknown:
        raise ValueError(f"quant=dict(...) takes {', '.join(known)}; got unknown key(s) {unknown} "
                         "(activation widths are chosen per op by the lowering: INT8 into GEMMs, INT16 elsewhere)")
    options = dict(gelu=REGISTRY["gelu"].variant(quant.get("gelu")).name,
                   softmax=REGISTRY["softmax"].variant(quant.get("softmax")).name,
                   weight_bits=quant.get("weight_bits", 8), select=quant.get("select", "global"),
                   size_ratio=float(quant.get("size_ratio", 6.0)), weight_rounding=quant.get("weight_rounding", "gptq"),
                   int8_weights=quant.get("int8_weights") or ())
    if isinstance(options["int8_weights"], str) or not all(isinstance(p, str) and p
                                                           for p in options["int8_weights"]):
        raise ValueError(f"int8_weights is a list of module paths (e.g. ['decode_head']), got "
                         f"{options['int8_weights']!r}")
    options["int8_weights"] = tuple(options["int8_weights"])
    if options["weight_bits"] not in WEIGHT_CHOICES:
        raise ValueError(f"weight_bits must be one of {WEIGHT_CHOICES}, got {options['weight_bits']!r}")
    if options["select"] not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {options['select']!r}")
    if options["weight_rounding"] not in ROUNDINGS:
        raise ValueError(f"weight_rounding must be one of {ROUNDINGS}, got {options['weight_rounding']!r}")
    if options["size_ratio"] <= 0:
        raise ValueError(f"size_ratio must be positive, got {options['size_ratio']}")
    return options


def prepare_options(quant: dict) -> dict:
    """The ``fx_patterns.prepare`` options of a checked ``quant`` dict (a mixed model starts at INT8 weights)."""
    return dict(gelu=quant["gelu"], softmax=quant["softmax"], weight_bits=4 if quant["weight_bits"] == 4 else 8)


def choose(prepared: fx.GraphModule, inputs: list[tuple], quant: dict, weights: MetricWeights = MetricWeights(),
           rounding_inputs: list[tuple] | None = None, for_training: bool = False) -> list[dict] | None:
    """Stages 1 and 2 for what a checked ``quant`` dict asks (unified GELU / softmax, mixed weight widths),
    scored on ``inputs`` and written into the calibrated ``prepared`` graph, then GPTQ of the INT4 weights on
    ``rounding_inputs`` (None: no GPTQ; ``for_training``: before QAT, :func:`iseg_plugin.gptq.gptq`) if
    ``quant`` asks for it. Returns the table rows, or None when nothing is chosen per layer."""

    rows = []
    pinned = keep_int8(prepared, quant["int8_weights"]) if quant["weight_bits"] != 8 else []
    if quant["select"] == "unified":
        rows += score_variants(prepared, inputs, weights)
    if quant["weight_bits"] == "mixed":
        rows += assign_weight_bits(score_weight_bits(prepared, inputs), quant["size_ratio"], weights, pinned=pinned)
    if rows:
        apply(prepared, rows)
    if rounding_inputs and quant["weight_rounding"] == "gptq":
        gptq(prepared, rounding_inputs, for_training)
    return rows or None
