"""The structure view: any small torch model → a layer graph (shapes, parameter counts) → a drawing whose units are
coloured by a statistic.

    graph = trace_model(model, example_B1HW)                 # torch.fx + ShapeProp; forward hooks if fx cannot trace
    graph.to_dict()                                          # UI-free, JSON-able
    svg = render_svg(graph, stats={"act3": effect_U})        # interactive (hover tooltips), embeddable in HTML
    html = render_html(graph, stats, title="...")
    fig = render_png(graph, stats, "structure.png")          # static matplotlib figure for the docs

Node names are module qualified names for module calls (the names forward hooks use, e.g. "conv2", "blocks.0.attn")
and torch.fx node names for functions ("add", "cat"). A statistic is a mapping node name → per-unit values: a 1-D
array (one value per channel/neuron, drawn as a near-square grid) or a 2-D array (drawn as that grid, e.g. a
28×28 pixel attribution on the input node).
"""

from __future__ import annotations

import html as _html
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# fx nodes that only re-index or query a tensor: dropped from the drawing (their inputs are wired to their users).
_PASS_THROUGH = frozenset({"getitem", "getattr", "size", "dim", "contiguous", "type_as", "to"})


@dataclass(frozen=True)
class LayerNode:
    """One node of the layer graph."""

    name: str
    """Module qualified name (hookable) for module calls, the fx node name otherwise."""
    op: str
    """'input', 'module', 'function', 'method', 'param' or 'output'."""
    kind: str
    """Module class ('Conv2d'), function or method name ('add', 'flatten'), or 'input'/'output'/'param'."""
    out_shape: tuple[int, ...] | None
    """Output shape without the batch dimension (None where unknown, e.g. a tuple output)."""
    n_params: int
    """Parameters owned by this node (a module's parameters, a parameter node's size)."""
    n_units: int
    """Units a statistic can colour: channels of (C, H, W), the last dimension of (D,) or (T, D) outputs, else 0."""
    inputs: tuple[str, ...]
    """Names of the nodes this one reads."""
    detail: str = ""
    """A one-line description (the module's repr without children)."""


@dataclass(frozen=True)
class LayerGraph:
    """A traced model: nodes in execution order."""

    model_name: str
    """Class name of the traced model (or the name given)."""
    nodes: tuple[LayerNode, ...]
    """Nodes in topological (execution) order."""
    traced_with: str
    """'fx' (exact dataflow) or 'hooks' (leaf modules in call order, edges follow that order: an approximation)."""
    n_params: int
    """Trainable parameters of the whole model (each counted once)."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Free-form extras (example input shape)."""

    def __post_init__(self):
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate node names in the graph: {sorted({n for n in names if names.count(n) > 1})}")
        known = set()
        for n in self.nodes:
            missing = [i for i in n.inputs if i not in known]
            if missing:
                raise ValueError(f"node {n.name!r} reads {missing}, which come later or do not exist: nodes must be topologically ordered")
            known.add(n.name)

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(src, n.name) for n in self.nodes for src in n.inputs]

    def node(self, name: str) -> LayerNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r}; nodes are {[n.name for n in self.nodes]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerGraph":
        nodes = tuple(
            LayerNode(**{**n, "out_shape": None if n["out_shape"] is None else tuple(n["out_shape"]), "inputs": tuple(n["inputs"])})
            for n in d["nodes"]
        )
        return cls(d["model_name"], nodes, d["traced_with"], d["n_params"], dict(d.get("meta", {})))

    def summary(self) -> str:
        """A plain-text table (name, kind, output shape, params), like torchinfo's."""
        rows = [f"{self.model_name}  ({self.n_params:,} parameters, traced with {self.traced_with})"]
        rows.append(f"{'node':<22}{'kind':<20}{'output':<18}{'params':>10}")
        for n in self.nodes:
            shape = "?" if n.out_shape is None else "×".join(map(str, n.out_shape)) or "scalar"
            rows.append(f"{n.name:<22}{n.kind:<20}{shape:<18}{n.n_params:>10,}")
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- tracing
def trace_model(model: nn.Module, example: Tensor, name: str | None = None, method: str = "auto") -> LayerGraph:
    """Trace `model` on `example` (a batch, e.g. (1, 1, 28, 28)) into a LayerGraph.

    method: 'fx' (torch.fx symbolic trace + shape propagation: the exact dataflow, raises if the model cannot be traced),
    'hooks' (forward hooks on leaf modules: works for any model, edges follow call order) or 'auto' (fx, then hooks).
    """
    if method not in ("auto", "fx", "hooks"):
        raise ValueError(f"method must be 'auto', 'fx' or 'hooks', got {method!r}")
    name = name or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        if method in ("auto", "fx"):
            try:
                return _trace_fx(model, example, name)
            except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as e:
                if method == "fx":
                    raise ValueError(f"torch.fx cannot trace {name} ({type(e).__name__}: {e}); use method='hooks'") from e
        return _trace_hooks(model, example, name)
    finally:
        model.train(was_training)


def _units(shape: tuple[int, ...] | None) -> int:
    if not shape:
        return 0
    return shape[0] if len(shape) == 3 else shape[-1]  # (C, H, W) → channels; (D,) / (T, D) → features


def _short_repr(m: nn.Module) -> str:
    extra = m.extra_repr()
    return f"{type(m).__name__}({extra})" if extra else type(m).__name__


def _trace_fx(model: nn.Module, example: Tensor, name: str) -> LayerGraph:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    rename: dict[str, str] = {}  # fx node name → graph node name
    raw: list[LayerNode] = []
    seen_targets: dict[str, int] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and not hasattr(meta, "shape"):  # multi-output (e.g. MultiheadAttention): the first tensor
            meta = meta[0] if isinstance(meta, (tuple, list)) and meta and hasattr(meta[0], "shape") else None
        shape = tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") and len(meta.shape) else None
        if node.op == "get_attr" and meta is not None and hasattr(meta, "shape"):
            shape = tuple(meta.shape)  # a parameter has no batch dimension
        inputs = tuple(rename[a.name] for a in node.all_input_nodes)
        if node.op == "placeholder":
            gname, op, kind, n_params, detail = node.name, "input", "input", 0, ""
        elif node.op == "output":
            gname, op, kind, n_params, detail = "output", "output", "output", 0, ""
        elif node.op == "call_module":
            m = modules[node.target]
            count = seen_targets.get(node.target, 0) + 1
            seen_targets[node.target] = count
            # a module called twice gets "name#2": hooks on it see only its last call
            gname = node.target if count == 1 else f"{node.target}#{count}"
            op, kind, detail = "module", type(m).__name__, _short_repr(m)
            n_params = sum(p.numel() for p in m.parameters())
        elif node.op == "get_attr":
            gname, op, kind, detail = node.target, "param", "param", ""
            n_params = params[node.target].numel() if node.target in params else 0
        else:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            gname, op, kind, n_params, detail = node.name, "function" if node.op == "call_function" else "method", target, 0, ""
        rename[node.name] = gname
        raw.append(LayerNode(gname, op, kind, shape, n_params, _units(shape) if op != "param" else 0, inputs, detail))
    nodes = _collapse(raw)
    return LayerGraph(name, tuple(nodes), "fx", sum(p.numel() for p in model.parameters()), {"example_shape": list(example.shape)})


def _collapse(nodes: list[LayerNode]) -> list[LayerNode]:
    """Drop pass-through nodes (getitem, size, …), wiring their inputs to their users."""
    alias: dict[str, tuple[str, ...]] = {}
    out = []
    for n in nodes:
        inputs = tuple(dict.fromkeys(i for src in n.inputs for i in alias.get(src, (src,))))
        if n.op in ("function", "method") and n.kind in _PASS_THROUGH:
            alias[n.name] = inputs
            continue
        out.append(LayerNode(n.name, n.op, n.kind, n.out_shape, n.n_params, n.n_units, inputs, n.detail))
    return out


def _trace_hooks(model: nn.Module, example: Tensor, name: str) -> LayerGraph:
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    calls: list[tuple[str, nn.Module, tuple[int, ...] | None]] = []

    def make_hook(mod_name):
        def hook(mod, args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            calls.append((mod_name, mod, tuple(t.shape[1:]) if isinstance(t, Tensor) and t.dim() else None))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    nodes = [LayerNode("x", "input", "input", tuple(example.shape[1:]), 0, _units(tuple(example.shape[1:])), ())]
    counts: dict[str, int] = {}
    for mod_name, m, shape in calls:
        counts[mod_name] = counts.get(mod_name, 0) + 1
        gname = mod_name if counts[mod_name] == 1 else f"{mod_name}#{counts[mod_name]}"
        n_params = sum(p.numel() for p in m.parameters())
        nodes.append(LayerNode(gname, "module", type(m).__name__, shape, n_params, _units(shape), (nodes[-1].name,), _short_repr(m)))
    t = out[0] if isinstance(out, (tuple, list)) else out
    shape = tuple(t.shape[1:]) if isinstance(t, Tensor) else None
    nodes.append(LayerNode("output", "output", "output", shape, 0, _units(shape), (nodes[-1].name,)))
    n_total = sum(p.numel() for p in model.parameters())
    return LayerGraph(name, tuple(nodes), "hooks", n_total, {"example_shape": list(example.shape)})


# ---------------------------------------------------------------------------------------------------- layout
BOX_W = 132.0
"""Width of a node box (SVG user units = px)."""
GAP_X = 34.0
GAP_Y = 16.0
LINE_H = 13.0
GRID_MAX = 112.0
"""Largest side of a unit grid."""
MAX_CELLS = 4096


@dataclass
class _Prim:
    """A drawing primitive shared by the SVG and matplotlib back ends."""

    kind: str  # 'rect' | 'text' | 'edge'
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0
    fill: str = "none"
    stroke: str = "none"
    text: str = ""
    size: float = 10.0
    bold: bool = False
    title: str = ""
    pts: list[tuple[float, float]] = field(default_factory=list)
    data: dict[str, str] = field(default_factory=dict)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _colours(values: np.ndarray, cmap_name: str | None) -> tuple[list[str], str, float, float]:
    """Hex colours for finite values (NaN → grey), the colormap used and its range (symmetric if values change sign)."""
    import matplotlib

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    diverging = lo < 0 < hi
    if diverging:
        m = max(abs(lo), abs(hi))
        lo, hi = -m, m
    name = cmap_name or ("RdBu_r" if diverging else "viridis")
    cmap = matplotlib.colormaps[name]
    span = hi - lo if hi > lo else 1.0
    out = []
    for v in values:
        out.append("#bbbbbb" if not np.isfinite(v) else matplotlib.colors.to_hex(cmap((v - lo) / span)))
    return out, name, lo, hi


def layout(
    graph: LayerGraph,
    stats: Mapping[str, Any] | None = None,
    stat_name: str = "",
    max_cols: int = 8,
    hide: Sequence[str] = (),
    cmap: str | None = None,
) -> tuple[list[_Prim], float, float]:
    """Place the nodes (layered by dataflow depth, wrapped into bands of `max_cols` columns) and build primitives.

    Returns (primitives, width, height). `hide` lists node kinds to leave out (e.g. ('param',)).
    """
    stats = {k: np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=np.float64) for k, v in (stats or {}).items()}
    unknown = set(stats) - {n.name for n in graph.nodes}
    if unknown:
        raise KeyError(f"statistics given for nodes not in the graph: {sorted(unknown)}; node names are {[n.name for n in graph.nodes]}")
    shown = [n for n in graph.nodes if n.kind not in hide]
    shown_names = {n.name for n in shown}
    depth: dict[str, int] = {}
    for n in graph.nodes:  # longest path from an input, over visible nodes
        parents = [depth[i] for i in n.inputs if i in depth]
        depth[n.name] = (max(parents) + 1 if parents else 0) if n.name in shown_names else max(parents, default=-1)
    # compact depths (hidden nodes may leave gaps)
    levels = sorted({depth[n.name] for n in shown})
    col_of = {n.name: levels.index(depth[n.name]) for n in shown}

    heights: dict[str, float] = {}
    grids: dict[str, tuple[int, int, float]] = {}
    for n in shown:
        h = 4 * LINE_H + 8
        if n.name in stats:
            v = stats[n.name]
            if v.size > MAX_CELLS:
                raise ValueError(f"statistic for {n.name} has {v.size} values; at most {MAX_CELLS} can be drawn")
            rows, cols = v.shape if v.ndim == 2 else (math.ceil(v.size / math.ceil(math.sqrt(v.size))), math.ceil(math.sqrt(v.size)))
            cell = min(GRID_MAX / max(rows, cols), 14.0)
            grids[n.name] = (rows, cols, cell)
            h += rows * cell + LINE_H + 6
        heights[n.name] = h

    n_cols = len(levels)
    band_of = {name: c // max_cols for name, c in col_of.items()}
    # vertical extent of each band = tallest stack of one column in it
    col_stack: dict[int, float] = {}
    for n in shown:
        col_stack[col_of[n.name]] = col_stack.get(col_of[n.name], 0.0) + heights[n.name] + GAP_Y
    n_bands = max(band_of.values()) + 1 if band_of else 1
    band_h = [max((col_stack[c] for c in col_stack if c // max_cols == b), default=0.0) for b in range(n_bands)]
    band_y = [sum(band_h[:b]) + 28.0 * (b + 1) for b in range(n_bands)]

    pos: dict[str, tuple[float, float]] = {}
    used: dict[int, float] = {}
    for n in shown:
        c = col_of[n.name]
        b = band_of[n.name]
        x = 10.0 + (c % max_cols) * (BOX_W + GAP_X)
        y = band_y[b] + used.get(c, 0.0)
        used[c] = used.get(c, 0.0) + heights[n.name] + GAP_Y
        pos[n.name] = (x, y)

    prims: list[_Prim] = []
    # edges first (drawn under boxes); an edge between bands bends through the gap below the upper band
    resolve: dict[str, tuple[str, ...]] = {}
    for n in graph.nodes:
        srcs = tuple(dict.fromkeys(s for i in n.inputs for s in ((i,) if i in shown_names else resolve.get(i, ()))))
        resolve[n.name] = (n.name,) if n.name in shown_names else srcs
        if n.name not in shown_names:
            continue
        for s in srcs:
            (x0, y0), (x1, y1) = pos[s], pos[n.name]
            a = (x0 + BOX_W, y0 + 2 * LINE_H)
            z = (x1, y1 + 2 * LINE_H)
            if band_of[s] == band_of[n.name]:
                mid = (a[0] + z[0]) / 2
                pts = [a, (mid, a[1]), (mid, z[1]), z]
            else:
                y_gap = band_y[band_of[n.name]] - 14.0
                pts = [a, (a[0] + GAP_X / 2, a[1]), (a[0] + GAP_X / 2, y_gap), (z[0] - GAP_X / 2, y_gap), (z[0] - GAP_X / 2, z[1]), z]
            skip = col_of[n.name] - col_of[s] > 1  # a residual / skip connection: drawn in another colour
            prims.append(_Prim("edge", pts=pts, stroke="#4a78c2" if skip else "#888888", data={"src": s, "dst": n.name}))

    for n in shown:
        x, y = pos[n.name]
        shape = "?" if n.out_shape is None else "×".join(map(str, n.out_shape)) or "scalar"
        tip = f"{n.name}: {n.detail or n.kind}\noutput {shape}\n{n.n_params:,} parameters"
        fill = {"input": "#e8f1fb", "output": "#e8f1fb", "param": "#f4f4f4"}.get(n.op, "#ffffff" if n.n_params == 0 else "#fff6e0")
        prims.append(_Prim("rect", x, y, BOX_W, heights[n.name], fill=fill, stroke="#555555", title=tip, data={"node": n.name}))
        prims.append(_Prim("text", x + 6, y + LINE_H, text=n.name, size=10, bold=True))
        prims.append(_Prim("text", x + 6, y + 2 * LINE_H, text=n.kind, size=9))
        prims.append(_Prim("text", x + 6, y + 3 * LINE_H, text=shape, size=9))
        prims.append(_Prim("text", x + 6, y + 4 * LINE_H, text=f"{n.n_params:,} params" if n.n_params else "", size=9))
        if n.name in grids:
            rows, cols, cell = grids[n.name]
            v = stats[n.name]
            cols_hex, used_cmap, lo, hi = _colours(v.ravel(), cmap)
            gx = x + (BOX_W - cols * cell) / 2
            gy = y + 4 * LINE_H + 8
            for i, (val, colour) in enumerate(zip(v.ravel(), cols_hex)):
                r, c = divmod(i, cols)
                prims.append(
                    _Prim(
                        "rect", gx + c * cell, gy + r * cell, cell, cell, fill=colour, stroke="none",
                        title=f"{n.name} · unit {i} · {stat_name or 'value'} {_fmt(val)}", data={"node": n.name, "unit": str(i)},
                    )
                )
            prims.append(_Prim("text", x + 6, gy + rows * cell + LINE_H - 2, text=f"{stat_name} [{_fmt(lo)}, {_fmt(hi)}]", size=8))
    width = 20.0 + min(n_cols, max_cols) * (BOX_W + GAP_X)
    height = band_y[-1] + band_h[-1] + 10.0
    return prims, width, height


# ---------------------------------------------------------------------------------------------------- back ends
def render_svg(graph: LayerGraph, stats: Mapping[str, Any] | None = None, stat_name: str = "", title: str = "", **layout_kw) -> str:
    """A standalone SVG string; every box and unit cell has a hover tooltip and data-node / data-unit attributes."""
    prims, width, height = layout(graph, stats, stat_name, **layout_kw)
    top = 22.0 if title else 0.0
    esc = _html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height + top:.0f}" width="{width:.0f}" height="{height + top:.0f}" '
        'font-family="DejaVu Sans, Arial, sans-serif" class="nacosae-structure">',
        '<defs><marker id="arr" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>',
        '<style>.unit:hover{stroke:#000;stroke-width:1.5}.node:hover{stroke:#d62728;stroke-width:2}</style>',
    ]
    if title:
        out.append(f'<text x="10" y="16" font-size="14" font-weight="bold">{esc(title)}</text>')
    out.append(f'<g transform="translate(0,{top})">')
    for p in prims:
        data = "".join(f' data-{k}="{esc(v)}"' for k, v in p.data.items())
        if p.kind == "edge":
            d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(p.pts))
            out.append(f'<path d="{d}" fill="none" stroke="{p.stroke}" stroke-width="1.2" marker-end="url(#arr)"{data}/>')
        elif p.kind == "rect":
            cls = "unit" if "unit" in p.data else "node"
            rx = ' rx="4"' if cls == "node" else ""
            out.append(
                f'<rect class="{cls}" x="{p.x:.1f}" y="{p.y:.1f}" width="{p.w:.2f}" height="{p.h:.2f}" fill="{p.fill}" '
                f'stroke="{p.stroke}"{rx}{data}><title>{esc(p.title)}</title></rect>'
            )
        else:
            weight = ' font-weight="bold"' if p.bold else ""
            out.append(f'<text x="{p.x:.1f}" y="{p.y:.1f}" font-size="{p.size}"{weight}>{esc(p.text)}</text>')
    out.append("</g></svg>")
    return "\n".join(out)


def render_html(graph: LayerGraph, stats: Mapping[str, Any] | None = None, stat_name: str = "", title: str = "", **layout_kw) -> str:
    """A self-contained HTML page (scrollable) around `render_svg`, with the text summary under it."""
    svg = render_svg(graph, stats, stat_name, title, **layout_kw)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{_html.escape(title or graph.model_name)}</title></head><body>"
        f"<div style='overflow:auto'>{svg}</div><pre>{_html.escape(graph.summary())}</pre></body></html>"
    )


def render_png(
    graph: LayerGraph, stats: Mapping[str, Any] | None = None, path=None, stat_name: str = "", title: str = "", dpi: int = 130, **layout_kw
):
    """The same drawing with matplotlib; saved to `path` when given. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    prims, width, height = layout(graph, stats, stat_name, **layout_kw)
    px = 1 / 100  # 100 SVG units per inch
    fig = plt.figure(figsize=(width * px, (height + 24) * px))
    ax = fig.add_axes((0, 0, 1, height / (height + 24)))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=11, fontweight="bold")
    pt = 72 * px  # SVG font size (px) → points at this figure scale
    for p in prims:
        if p.kind == "edge":
            xs, ys = zip(*p.pts)
            ax.plot(xs[:-1] + (xs[-1],), ys, color=p.stroke, lw=0.8, zorder=1)
            ax.add_patch(FancyArrowPatch(p.pts[-2], p.pts[-1], arrowstyle="-|>", mutation_scale=7, color=p.stroke, lw=0.8, zorder=1))
        elif p.kind == "rect":
            ax.add_patch(Rectangle((p.x, p.y), p.w, p.h, facecolor=p.fill, edgecolor=None if p.stroke == "none" else p.stroke,
                                   lw=0 if p.stroke == "none" else 0.8, zorder=2))
        else:
            ax.text(p.x, p.y, p.text, fontsize=p.size * pt, fontweight="bold" if p.bold else "normal", va="baseline", zorder=3)
    if path is not None:
        from nacosae.lab._plot import save_fig

        save_fig(fig, path, dpi=dpi)
    return fig
