"""nacosae feature explorer: browse, inspect, name live and steer the features of a vision SAE.

    python app.py                                             # Hub repos from space_config/defaults.json, else the demo
    python app.py --sae-repo owner/saes --results-repo owner/results
    python app.py --sae-repo runs/hub/sae --results-repo runs/hub/results     # local folders in the Hub layout
    NACOSAE_SAE_REPO=... NACOSAE_RESULTS_REPO=... python app.py               # the same through the environment

With no network (or repos that do not load) the app serves the bundled demo in `demo/` (built by
hub_scripts/build_demo.py from the offline default: EfficientNet-Lite0 blocks.14 SAE on Open Clip Art).
All work happens in `nacosae.serve`, which returns data; this file is the UI: it lays out the page and turns that
data into markdown and captions.

Hardware (`hardware` in space_config/defaults.json, or env NACOSAE_HARDWARE): "cpu-basic" runs everything on the CPU
and decorates nothing; "zero-a10g" (ZeroGPU) puts the model work in `@spaces.GPU` functions that move the backbone and
SAE to CUDA, return CPU data, and ask for a `duration` computed from the work (`serve.gpu_seconds`), since ZeroGPU
charges it against the visitor's daily quota. Input is checked before a GPU function is entered, and errors inside
one are `gr.Error`, so a visitor reads the same words on both. Live naming needs no GPU once the SAE's render pool
exists (it scores prompts by lookups in the pool): only building a missing pool is GPU work, in chunks.

Visitors: the "Load other repos" box takes Hub ids only (`serve.visitor_source`: validated, only the needed files,
size-capped); local folders come only from the flags and environment above. Every message a visitor sees goes
through `serve.public_message`, so no server path reaches the page.
"""

import json  # noqa: I001 - the hardware is read before anything imports torch
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULTS = json.loads((ROOT / "space_config" / "defaults.json").read_text())
HARDWARE = os.environ.get("NACOSAE_HARDWARE") or DEFAULTS.get("hardware", "cpu-basic")
ZERO_GPU = HARDWARE.startswith("zero")
if ZERO_GPU:
    import spaces  # first: on ZeroGPU it must patch CUDA before torch initialises it

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

_READY = threading.Event()  # set once START exists
_FIRST_SERVED = threading.Event()  # set once a browser got its first page


def _background_start():
    """Start-up work off the main thread: import the heatmap code (torch, matplotlib) while gradio imports, render the
    first feature page into the cache, then (once the first visitor has their page, so the two do not compete for
    the CPU) load the backbone and SAE weights that uploads, steering and naming need."""
    import matplotlib  # noqa: F401
    import torch  # noqa: F401

    import nacosae.features  # noqa: F401

    set_torch_threads()
    _READY.wait()
    try:
        sid = START.sae_ids[0]
        first = START.browse(sid, hide_dense=True)
        if len(first):
            START.feature_page(sid, int(first.iloc[0]["feature"]))
        _FIRST_SERVED.wait(timeout=30)
        warm_up()
    except serve.ServeError as e:
        print(f"[app] warm-up failed: {e}", file=sys.stderr)


def set_torch_threads():
    """One torch thread per request: requests run side by side, and OpenMP threads on a shared or busy CPU slow a
    70 ms EfficientNet pass down ~10× (benchmarks/bench_app.py). NACOSAE_TORCH_THREADS overrides."""
    import torch

    torch.set_num_threads(int(os.environ.get("NACOSAE_TORCH_THREADS", "1")))


def warm_up():
    """Load the backbone and SAE weights of the start-up source (CPU copies: a ZeroGPU worker moves them to CUDA).
    On ZeroGPU this runs to the end before the server starts, so no thread holds a lock while ZeroGPU forks its
    workers (`serve` also resets its locks in a forked child)."""
    if os.environ.get("NACOSAE_WARM_UP", "1") != "0":
        START.warm_up(START.sae_ids[0])


if __name__ == "__main__" and not ZERO_GPU:
    threading.Thread(target=_background_start, daemon=True).start()

import gradio as gr  # noqa: E402

from nacosae import serve  # noqa: E402

DEMO = serve.Source(str(ROOT / DEFAULTS.get("demo_dir", "demo") / "sae"), str(ROOT / DEFAULTS.get("demo_dir", "demo") / "results"),
                    label="bundled demo")
# Live naming: seconds of loop per chunk; 0 = one round per chunk, so the page shows every round (the loop runs on the
# CPU whatever the hardware: it reads the render pool). A missing pool is encoded POOL_CHUNK pictures per GPU call.
NAMING_CHUNK_S = float(os.environ.get("NACOSAE_NAMING_CHUNK_S", "0"))
POOL_CHUNK = int(os.environ.get("NACOSAE_POOL_CHUNK", "512" if ZERO_GPU else "64"))


def gpu(duration):
    """`spaces.GPU(duration=...)` on ZeroGPU hardware, else nothing: on cpu-basic no function is decorated."""
    if ZERO_GPU:
        return spaces.GPU(duration=duration)
    return lambda fn: fn


def gpu_device() -> str:
    """Where a GPU function runs the models: CUDA on ZeroGPU (inside the function ZeroGPU has attached one), else the
    explorer's CPU."""
    if ZERO_GPU:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog=os.environ.get("NACOSAE_PROG"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae-repo", default=os.environ.get("NACOSAE_SAE_REPO", DEFAULTS["sae_repo"]),
                    help="SAE model repo id or local folder (env NACOSAE_SAE_REPO; default: %(default)s)")
    ap.add_argument("--results-repo", default=os.environ.get("NACOSAE_RESULTS_REPO", DEFAULTS["results_repo"]),
                    help="results dataset repo id or local folder (env NACOSAE_RESULTS_REPO; default: %(default)s)")
    ap.add_argument("--revision", default=os.environ.get("NACOSAE_REVISION"), help="Hub revision of both repos")
    ap.add_argument("--demo", action="store_true", default=os.environ.get("NACOSAE_DEMO") == "1",
                    help="serve the bundled demo without trying the repos (env NACOSAE_DEMO=1)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                    help="port to serve on (default: $GRADIO_SERVER_PORT or 7860)")
    return ap.parse_args(argv)


ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])


def startup_explorer(args) -> tuple[serve.Explorer, str]:
    """The configured repos, or the bundled demo when they do not load (with a notice saying why). Pinned: it stays
    open whatever visitors load."""
    if not args.demo:
        try:
            ex = serve.open_explorer(serve.Source(args.sae_repo, args.results_repo, args.revision, label="configured repos"),
                                     pin=True)
            return ex, "\n".join(f"⚠️ {serve.public_message(w)}" for w in ex.warnings)
        except serve.ServeError as e:
            reason = str(e).splitlines()[0]
            print(f"[app] {reason}; serving the bundled demo", file=sys.stderr)
            if not Path(DEMO.results_repo).is_dir():
                raise SystemExit(f"{reason}, and there is no bundled demo in {DEMO.results_repo}: run "
                                 "hub_scripts/build_demo.py, or pass --sae-repo/--results-repo local folders") from e
            notice = f"Showing the **bundled demo**: {serve.public_message(reason)}"
            return serve.open_explorer(DEMO, pin=True), notice
    return serve.open_explorer(DEMO, pin=True), ""


START, NOTICE = startup_explorer(ARGS)
_READY.set()


# ================================================================================================ handler plumbing
def _explorer(key: str) -> serve.Explorer:
    """The session's source: a key only looks up an explorer that is already open, it never opens one."""
    return serve.explorer(key)


def user_errors(fn):
    """ServeError → gr.Error: the user sees the message (never a server path), the app keeps serving."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except serve.ServeError as e:  # inside a GPU function too: only gr.Error crosses the ZeroGPU worker boundary
            raise gr.Error(serve.public_message(str(e)), duration=None) from e
    return wrapper


def gpu_errors(fn):
    """For the functions that run in a ZeroGPU worker: a ServeError becomes its gr.Error (`user_errors`), and any
    other failure (CUDA out of memory, a model error) a gr.Error naming only its kind, printed in full to the log; so
    the visitor reads the same words on ZeroGPU as on the CPU, never "ZeroGPU worker error"."""
    inner = user_errors(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - the worker boundary passes only gr.Error: say what failed, log the rest
            import traceback

            traceback.print_exc()
            raise gr.Error(f"the model failed on this request ({type(e).__name__}); try again, or with another input",
                           duration=None) from e
    return wrapper


# ================================================================================================ formatting
def _fmt(x, spec: str = "{:.3f}") -> str:
    """A number for a table or sentence; '–' for a missing or non-finite one."""
    return spec.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "–"


def feature_title(page: serve.FeaturePage) -> str:
    by = f" · name by {page.name_method}" if page.name_method else ""
    return f"### Feature #{page.feature} · {page.name}  \n<small>{page.sae_id}{by}</small>"


def feature_summary(page: serve.FeaturePage) -> str:
    st = page.stats
    text = (f"fires on **{(st['image_frequency'] or 0) * 100:.2f} %** of probe images "
            f"({(st['token_frequency'] or 0) * 100:.2f} % of tokens) · max activation **{_fmt(st['max_act'], '{:.2f}')}** · "
            f"mean {_fmt(st['mean_act'])} (image level: {st['aggregation']} over tokens)")
    if st.get("ms") is not None:
        text += f" · Monosemanticity Score **{_fmt(st['ms'])}**" + (f" ({st['ms_encoder']})" if st.get("ms_encoder") else "")
    flags = (["**dead** (never fired on the probe set)"] if st["dead"] else []) + (
        ["**dense** (fires on more than half of the images)"] if st["dense"] else [])
    return text + ("\n\n" + "; ".join(flags) if flags else "")


def names_table(page: serve.FeaturePage):
    import pandas as pd

    n = page.names
    return pd.DataFrame({"method": n["method"], "name": [x if isinstance(x, str) else "–" for x in n["name"]],
                         "CoSy AUC": [_fmt(x) for x in n["cosy_auc"]], "CoSy MAD": [_fmt(x, "{:.2f}") for x in n["cosy_mad"]],
                         "published": ["✓" if x else "" for x in n["published"]]},
                        columns=["method", "name", "CoSy AUC", "CoSy MAD", "published"])


def mils_summary(page: serve.FeaturePage) -> str:
    if not page.mils_runs:
        return "No MILS run for this feature in the results dataset: name it live in the *Live naming* tab."
    parts = [f"**{r.method}** tried {r.n_prompts} prompts over {r.n_iterations} iterations; best *{r.best_prompt}* "
             f"({r.best_score:.3f})" + (f" → name **{r.name}**" if r.name else "") for r in page.mils_runs]
    return "  \n".join(parts) + "  \nScores: the feature's activation on a prompt's renders, divided by its max on the probe set."


def render_captions(items) -> list:
    """(image, caption) pairs of renders: score · prompt (· loop, when not the plain MILS one)."""
    return [(it.image, f"{_fmt(it.score, '{:.2f}')} · {it.label}" + (f" ({it.method})" if it.method not in (None, "mils") else ""))
            for it in items]


def page_outputs(page: serve.FeaturePage):
    # bins in their numeric order: the plot would otherwise sort the interval labels as text ("1–1.25" after "1.75–2")
    histogram = gr.BarPlot(value=page.histogram, sort=list(page.histogram["activation"]))
    gallery = [(it.image, f"{it.score:.2f}" + (f" · {it.label}" if it.label else "")) for it in page.gallery]
    return (page.feature, feature_title(page), feature_summary(page), gallery, histogram, names_table(page),
            mils_summary(page), page.mils_history, render_captions(page.mils_gallery), page.mils_curve)


def browser_rows(table):
    """The browser's rows for display: frequency as a percentage."""
    table = table.copy()
    table["frequency"] = [f"{100 * float(v):.2f} %" for v in table["frequency"]]
    return table


def steer_note(r: serve.SteerResult) -> str:
    verb = {"clamp": f"clamped to {r.value:g}", "ablate": "ablated (clamped to 0)", "add": f"added with strength {r.value:g}"}[r.mode]
    top = r.changes.iloc[0]
    return (f"Feature #{r.feature} ({r.name}) {verb} at every token of {r.layer}; {r.scores}. "
            f"Largest change: **{top['label']}** {top['change']:+.3f}.")


@user_errors
def browse(key, sae_id, query, sort, hide_dead, hide_dense):
    return browser_rows(_explorer(key).browse(sae_id, query, sort, hide_dead, hide_dense))


@user_errors
def open_feature(key, sae_id, feature):
    if feature is None:
        raise serve.ServeError("type a feature number")
    return page_outputs(_explorer(key).feature_page(sae_id, int(feature)))


@user_errors
def select_feature(key, sae_id, table, evt: gr.SelectData):
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    feature = evt.row_value[0] if getattr(evt, "row_value", None) else table.iloc[row]["feature"]
    return page_outputs(_explorer(key).feature_page(sae_id, int(feature)))


@user_errors
def first_page(key, sae_id, query, sort, hide_dead, hide_dense):
    """The browser and the page of its first feature (start-up, SAE switch)."""
    table = browse(key, sae_id, query, sort, hide_dead, hide_dense)
    feature = int(table.iloc[0]["feature"]) if len(table) else 0
    out = (table, *page_outputs(_explorer(key).feature_page(sae_id, feature)))
    _FIRST_SERVED.set()
    return out


@user_errors
def load_source(sae_repo, results_repo, query, sort, hide_dead, hide_dense):
    """A visitor's "Load": two Hub repo ids (never local folders), downloaded with the visitor limits."""
    if not (sae_repo or "").strip() or not (results_repo or "").strip():
        raise serve.ServeError("give both an SAE repo and a results repo (Hub ids 'owner/name')")
    ex = serve.open_explorer(serve.visitor_source(sae_repo, results_repo))
    for w in ex.warnings:
        gr.Warning(serve.public_message(w))
    sae_id = ex.sae_ids[0]
    return (ex.source.key, gr.Dropdown(choices=ex.sae_ids, value=sae_id),
            f"Loaded **{ex.source.sae_repo}** + **{ex.source.results_repo}** ({len(ex.sae_ids)} SAE(s)).",
            *first_page(ex.source.key, sae_id, query, sort, hide_dead, hide_dense))


def _uploaded(image):
    """The uploaded file's path from Gradio's raw payload (events with uploads run with preprocess=False, so an
    unreadable file reaches `serve.check_image`, which says what is wrong, instead of failing inside Gradio)."""
    if isinstance(image, dict):
        return image.get("path")
    return getattr(image, "path", image)


@gpu(duration=lambda key, sae_id, image, top: serve.gpu_seconds("what_fires"))
@gpu_errors
def _gpu_what_fires(key, sae_id, image, top):
    """The model part of "what fires" (input already checked): on ZeroGPU, in a worker with CUDA; returns CPU data."""
    return _explorer(key).what_fires(sae_id, image, top, device=gpu_device())


@user_errors
def what_fires(key, sae_id, image, top):
    image, top = _explorer(key).check_what_fires(sae_id, _uploaded(image), top)  # before the GPU: same words on both
    r = _gpu_what_fires(key, sae_id, image, top)
    if not r.items:
        gr.Warning("no feature fires on this image")
    gallery = [(it.image, f"#{it.feature} · {it.name} · {it.relative:.0%} of max") for it in r.items]
    return gallery, r.table, r.features


@user_errors
def fires_open(key, sae_id, features, evt: gr.SelectData):
    """Clicking a result of "what fires" opens that feature's page."""
    page = _explorer(key).feature_page(sae_id, int(features[evt.index]))
    return (gr.Tabs(selected="features"), *page_outputs(page))


@gpu(duration=lambda key, sae_id, args: serve.gpu_seconds("steer"))
@gpu_errors
def _gpu_steer(key, sae_id, args):
    return _explorer(key).steer(sae_id, args["image"], args["feature"], args["mode"], args["value"], args["labels"],
                                device=gpu_device())


@user_errors
def steer(key, sae_id, image, feature, mode, value, labels):
    labels = [s for s in (labels or "").split(",") if s.strip()]
    args = _explorer(key).check_steer(sae_id, _uploaded(image), feature, mode, value, labels)
    r = _gpu_steer(key, sae_id, args)
    return r.before, r.after, r.changes, steer_note(r)


@gpu(duration=lambda key, sae_id, n: serve.gpu_seconds("pool", n))
@gpu_errors
def _gpu_build_pool(key, sae_id, n):
    """Encode about `n` more bank pictures into the SAE's render pool (a missing pool only: the demo ships its own)."""
    budget = 0.0 if ZERO_GPU else 5.0  # ZeroGPU: exactly the chunk it paid for; CPU: about 5 s between page updates
    return _explorer(key).build_pool(sae_id, budget_s=budget, device=gpu_device(), chunk=n)


def naming_status(v: serve.LiveNamingView) -> str:
    step = {"seeding": "seed prompts scored", "round": f"round {v.rounds_done}/{v.n_rounds}", "done": "done"}[v.step]
    best = f" · best *{v.best[0][1]}* (search AUC {v.best[0][0]:.3f})" if v.best else ""
    return f"**{step}** · {v.n_prompts} prompts scored for feature #{v.feature} · {v.elapsed_s:.1f} s{best}"


def naming_result(v: serve.LiveNamingView) -> str:
    if not v.done:
        return ""
    verdict = ("clears" if v.published else "is below") + f" the {v.threshold:.2f} threshold a published name needs"
    return (f"## {v.name}\nheld-out CoSy AUC **{_fmt(v.cosy_auc)}** (MAD {_fmt(v.cosy_mad, '{:.2f}')}) on evaluation pictures "
            f"neither the loop nor the selection saw: it {verdict}. Chosen on the selection split (score "
            f"{_fmt(v.split_score)}).")


def naming_outputs(v: serve.LiveNamingView, state, extra: str = ""):
    table = v.history.rename(columns={"round": "round (0: bank prompt)"})
    return (naming_status(v) + extra, naming_result(v), table, render_captions(v.gallery), v.curve, state)


def live_naming(key, sae_id, feature, proposer, rounds, proposals, max_seconds, state):
    """Stream live naming of one feature: the render pool (built in chunks when missing), then the engine's rounds
    (status, best prompts, their bank pictures, best-score curve), and at the end the selected name with its held-out
    CoSy AUC. `state` (gr.State) resumes a run stopped by the time limit or the Stop button."""
    try:
        ex = _explorer(key)
        problem = serve.naming_problem()
        if problem:
            raise serve.ServeError(problem)
        if feature is None:
            raise serve.ServeError("choose a feature number")
        fresh = ex.start_live_naming(sae_id, feature, proposer, rounds, proposals)  # checks before any work
        same = isinstance(state, dict) and all(state.get(k) == fresh[k] for k in
                                                ("sae_id", "feature", "proposer", "n_rounds", "n_proposals"))
        state = state if same else fresh
        yield ("opening the naming bank and this SAE's render pool (first use: up to a minute)…", "", None, [], None, state)
        status = ex.pool_status(sae_id)
        while not status.complete:
            note = f" ({status.note})" if status.note else ""
            yield (f"building this SAE's render pool: {status.n_done}/{status.n_total} bank pictures encoded "
                   f"(none was shipped with it{note}; built once, then kept)…", "", None, [], None, state)
            status = _gpu_build_pool(key, sae_id, POOL_CHUNK)
        if state["done"]:  # the same request again: its result
            yield naming_outputs(ex.live_naming_view(state), state)
            return
        t0 = time.perf_counter()
        while not state["done"]:
            if time.perf_counter() - t0 > float(max_seconds):
                gr.Warning(f"naming paused after {float(max_seconds):.0f} s (the time limit) after round "
                           f"{len(state['rounds'])}: press Name it again to go on from there")
                yield naming_outputs(ex.live_naming_view(state), state, " · **paused: time limit**")
                return
            state = ex.live_naming_step(state, NAMING_CHUNK_S)
            yield naming_outputs(ex.live_naming_view(state), state)
    except serve.ServeError as e:
        raise gr.Error(serve.public_message(str(e)), duration=None) from e


LAB_RUN = ROOT / "runs" / "lab"  # the trained lab experiment, when this checkout has one (hub_scripts/lab.py experiment)


def lab_problem() -> str | None:
    """Why the Lab tab cannot run here (its Fashion-MNIST test split missing), or None."""
    from nacosae.lab.data import DEFAULT_ROOT

    if not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        return "the Lab needs the Fashion-MNIST test images: Debian package dataset-fashion-mnist"
    return None


def lab_structure(model_kind, stat):
    """The small-network lab's structure view (SVG + summary): the trained baseline of runs/lab when it holds this kind
    of model, else a seeded untrained one. Lazy imports: the lab code stays out of the app's cold start."""
    from nacosae.lab.view import run_model_kind, structure_view_html

    run_dir = LAB_RUN if run_model_kind(LAB_RUN) == model_kind else None
    try:
        return structure_view_html(model_kind, stat, run_dir=run_dir)
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(serve.public_message(str(e)), duration=None) from e


# ================================================================================================ the UI
HEADER = """# nacosae · SAE feature explorer
Sparse-autoencoder features of a vision model: browse them, see where they fire, name them with a MILS-style loop,
and steer the model with them. Names carry their held-out CoSy AUC and the Monosemanticity Score where the results
have them."""


def build_ui(start: serve.Explorer, notice: str) -> gr.Blocks:
    sae0 = start.sae_ids[0]
    with gr.Blocks(title="nacosae · SAE feature explorer") as ui:
        src = gr.State(start.source.key)
        fire_features = gr.State([])
        name_state = gr.State(None)  # the live naming run: a small JSON dict (serve.start_live_naming)
        gr.Markdown(HEADER)
        note = gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            sae_dd = gr.Dropdown(start.sae_ids, value=sae0, label="SAE", scale=2, elem_id="sae")
            with gr.Accordion("Load other repos (Hub ids 'owner/name')", open=False):
                with gr.Row():  # the operator's repos shown only when they are Hub ids: no server path in the page
                    hub_ids = not any(Path(r).expanduser().exists() for r in (start.source.sae_repo, start.source.results_repo))
                    sae_repo = gr.Textbox(label="SAE model repo", value=start.source.sae_repo if hub_ids else "",
                                          placeholder="owner/saes", elem_id="load-sae-repo")
                    results_repo = gr.Textbox(label="results dataset repo", value=start.source.results_repo if hub_ids else "",
                                              placeholder="owner/results", elem_id="load-results-repo")
                load_btn = gr.Button("Load")
        with gr.Tabs() as tabs:
            with gr.Tab("Features", id="features"):
                with gr.Row():
                    with gr.Column(scale=5):
                        query = gr.Textbox(label="search names (or #number)", elem_id="query")
                        with gr.Row():
                            sort = gr.Radio(list(serve.SORTS), value="score", label="sort by")
                        with gr.Row():
                            hide_dead = gr.Checkbox(value=True, label="hide dead")
                            hide_dense = gr.Checkbox(value=True, label="hide dense")
                        table = gr.Dataframe(browser_rows(start.browse(sae0, hide_dense=True)), interactive=False, max_height=640, wrap=True,
                                             column_widths=["10%", "34%", "10%", "9%", "9%", "11%", "9%", "8%"], elem_id="browser")
                    with gr.Column(scale=6):
                        with gr.Row():
                            feat_num = gr.Number(label="feature", precision=0, elem_id="feature-number")
                            open_btn = gr.Button("Open", elem_id="open-feature")
                        title = gr.Markdown(elem_id="feature-title")
                        summary = gr.Markdown()
                        gallery = gr.Gallery(label="top images (heatmap: where the feature fires)", columns=3, height="auto",
                                             elem_id="top-images")
                        hist = gr.BarPlot(x="activation", y="images", title="activation histogram (images where it fires)",
                                          sort=None, height=220, x_label_angle=-45)
                        names = gr.Dataframe(label="names by method (CoSy on held-out renders)", interactive=False)
                        with gr.Accordion("MILS prompt history", open=False):
                            mils_md = gr.Markdown()
                            mils_curve = gr.LinePlot(x="iteration", y="best score", color="method", height=180)
                            mils_gallery = gr.Gallery(label="renders of the best prompts", columns=4, height="auto")
                            mils_table = gr.Dataframe(interactive=False, max_height=300)
            with gr.Tab("What fires on my image", id="fires"):
                with gr.Row():
                    with gr.Column(scale=1):
                        fire_img = gr.Image(type="filepath", label="your image", elem_id="fires-image")
                        fire_top = gr.Slider(1, 24, value=8, step=1, label="features to show")
                        fire_btn = gr.Button("What fires?", variant="primary", elem_id="fires-run")
                    with gr.Column(scale=2):
                        fire_gallery = gr.Gallery(label="most active features (relative to their max); click to open",
                                                  columns=4, height="auto", elem_id="fires-gallery")
                        fire_table = gr.Dataframe(interactive=False)
            naming_off, lab_off = serve.naming_problem(), lab_problem()
            proposers = [p for p in serve.PROPOSERS if not serve.proposer_problem(p)]
            with gr.Tab("Live naming", id="naming", visible=naming_off is None):
                gr.Markdown("The naming engine of the offline run, for one feature: pool-MILS on the SAE's render pool "
                            "of the offline bank (Open Clip Art, Noto emoji, scikit-image photos), seeded with the "
                            "bank's prompts and the descriptions of the feature's top pictures. Scores are AUCs against "
                            "control pictures; the name is chosen on a selection split and scored (CoSy) on an "
                            "evaluation split neither saw." + "".join(f"  \n*Not here: {p}.*" for p in
                                                                      (serve.proposer_problem(x) for x in serve.PROPOSERS) if p))
                with gr.Row():
                    with gr.Column(scale=1):
                        name_feat = gr.Number(label="feature", precision=0, elem_id="naming-feature")
                        proposer = gr.Dropdown(proposers, value=proposers[0], label="proposer", elem_id="naming-proposer")
                        iterations = gr.Slider(*serve.LIVE_ROUNDS, value=3, step=1, label="rounds (T)",
                                               elem_id="naming-iterations")
                        candidates = gr.Slider(*serve.LIVE_PROPOSALS, value=6, step=1, label="new prompts per round (n)",
                                               elem_id="naming-candidates")
                        max_seconds = gr.Slider(10, 900, value=300, step=10, label="time limit (s)")
                        with gr.Row():
                            name_btn = gr.Button("Name it", variant="primary", elem_id="naming-run")
                            stop_btn = gr.Button("Stop")
                    with gr.Column(scale=2):
                        name_status = gr.Markdown(elem_id="naming-status")
                        name_out = gr.Markdown(elem_id="naming-name")
                        name_gallery = gr.Gallery(label="bank pictures of the best prompts", columns=4, height="auto")
                        name_curve = gr.LinePlot(x="round", y="best score", height=180)
                        name_table = gr.Dataframe(label="prompts: every proposal and the best bank prompts",
                                                  interactive=False, max_height=300)
            with gr.Tab("Steering", id="steer"):
                with gr.Row():
                    with gr.Column(scale=1):
                        steer_img = gr.Image(type="filepath", label="your image", elem_id="steer-image")
                        steer_feat = gr.Number(label="feature", precision=0)
                        steer_mode = gr.Radio(list(serve.STEER_MODES), value="clamp", label="intervention")
                        steer_value = gr.Number(value=5.0, label="value (clamp: activation; add: strength)")
                        steer_labels = gr.Textbox(label="labels for zero-shot scores (CLIP backbones only), comma-separated")
                        steer_btn = gr.Button("Run", variant="primary")
                    with gr.Column(scale=2):
                        steer_note = gr.Markdown()
                        with gr.Row():
                            steer_before = gr.Label(label="before", num_top_classes=5)
                            steer_after = gr.Label(label="after", num_top_classes=5)
                        steer_changes = gr.Dataframe(label="largest changes", interactive=False)
            with gr.Tab("Lab", id="lab", visible=lab_off is None):
                gr.Markdown("The small-network lab (docs/lab.md): a small Fashion-MNIST classifier traced layer by layer, "
                            "its units coloured by a statistic over 256 test images (hover a cell for its value). The "
                            "trained baseline of `runs/lab` when this checkout has it for that model, else random weights.")
                with gr.Row():
                    lab_model = gr.Dropdown(["cnn", "mlp", "vit"], value="cnn", label="model", elem_id="lab-model")
                    lab_stat = gr.Radio(["mean", "firing_rate", "dead"], value="mean", label="statistic")
                    lab_btn = gr.Button("Draw", variant="primary", elem_id="lab-run")
                lab_view = gr.HTML(elem_id="lab-view")
            off = [f"*{what}* is off on this server: {why}." for what, why in (("Live naming", naming_off), ("Lab", lab_off))
                   if why]
            if off:
                gr.Markdown("  \n".join(off), elem_id="tabs-off")

        page = [feat_num, title, summary, gallery, hist, names, mils_md, mils_table, mils_gallery, mils_curve]
        filters = [query, sort, hide_dead, hide_dense]
        for comp in (query, sort, hide_dead, hide_dense):
            comp.change(browse, [src, sae_dd, *filters], table, api_name=False, trigger_mode="always_last",
                        show_progress="hidden")
        query.submit(browse, [src, sae_dd, *filters], table, api_name="browse")
        table.select(select_feature, [src, sae_dd, table], page, api_name=False)
        open_btn.click(open_feature, [src, sae_dd, feat_num], page, api_name="feature")
        feat_num.submit(open_feature, [src, sae_dd, feat_num], page, api_name=False)
        sae_dd.change(first_page, [src, sae_dd, *filters], [table, *page], api_name="switch_sae")
        load_btn.click(load_source, [sae_repo, results_repo, *filters], [src, sae_dd, note, table, *page], api_name="load_source")
        ui.load(first_page, [src, sae_dd, *filters], [table, *page], api_name=False)
        fire_btn.click(what_fires, [src, sae_dd, fire_img, fire_top], [fire_gallery, fire_table, fire_features],
                       api_name="what_fires", preprocess=False)
        fire_gallery.select(fires_open, [src, sae_dd, fire_features], [tabs, *page], api_name=False)
        run = name_btn.click(live_naming, [src, sae_dd, name_feat, proposer, iterations, candidates, max_seconds, name_state],
                             [name_status, name_out, name_table, name_gallery, name_curve, name_state], api_name="name_feature")
        stop_btn.click(None, None, None, cancels=[run], api_name=False)
        feat_num.change(lambda f: (f, f), feat_num, [name_feat, steer_feat], api_name=False, show_progress="hidden")
        steer_btn.click(steer, [src, sae_dd, steer_img, steer_feat, steer_mode, steer_value, steer_labels],
                        [steer_before, steer_after, steer_changes, steer_note], api_name="steer", preprocess=False)
        lab_btn.click(lab_structure, [lab_model, lab_stat], lab_view, api_name="lab_structure")
    return ui


demo = build_ui(START, NOTICE)


if __name__ == "__main__":
    if ZERO_GPU:  # to the end before serving: ZeroGPU forks its workers from this process
        set_torch_threads()
        t0 = time.perf_counter()
        warm_up()
        print(f"[app] warm-up done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    demo.queue(default_concurrency_limit=4).launch(server_name=ARGS.host, server_port=ARGS.port)
